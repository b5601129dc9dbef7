//! Kernel command line: tokenising `/proc/cmdline` the way the kernel does, and splitting a
//! command value into an argv.
//!
//! The kernel never passes dotted parameters (`bootlace.exec=…`) to init as arguments or
//! environment, so the init reads `/proc/cmdline` itself.

/// One `key[=value]` parameter from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Everything before the first `=`.
    pub key: String,
    /// Everything after the first `=`, with one pair of surrounding double quotes removed;
    /// `None` for a bare flag.
    pub value: Option<String>,
}

/// Splits a kernel command line into parameters, following the kernel's rules: parameters are
/// separated by whitespace; double quotes group whitespace and are removed from a quoted value.
/// Everything after a lone `--` belongs to init's argv and is not returned.
pub fn parse(line: &str) -> Vec<Param> {
    parse_bytes(line.as_bytes())
        .into_iter()
        .filter_map(|p| p.ok())
        .collect()
}

/// A `bootlace.*` parameter whose bytes are not UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel command line {key}=: the value is not UTF-8 ({value:?})")]
pub struct NotUtf8 {
    /// The key (lossily decoded).
    pub key: String,
    /// The value, lossily decoded.
    pub value: String,
}

/// [`parse`] for the raw bytes of `/proc/cmdline`. Only `bootlace.*` parameters are bootlace's
/// business: one whose key or value is not UTF-8 is returned as an error naming it; any other
/// parameter (meant for the kernel or the real init) is decoded lossily, never refused.
pub fn parse_bytes(line: &[u8]) -> Vec<Result<Param, NotUtf8>> {
    let mut params = Vec::new();
    let mut rest = trim_start(line);
    while !rest.is_empty() {
        let mut in_quote = false;
        let mut end = rest.len();
        for (i, &c) in rest.iter().enumerate() {
            if c == b'"' {
                in_quote = !in_quote;
            } else if c.is_ascii_whitespace() && !in_quote {
                end = i;
                break;
            }
        }
        let (token, tail) = rest.split_at(end);
        rest = trim_start(tail);
        if token == b"--" {
            break;
        }
        params.push(match std::str::from_utf8(token) {
            Ok(t) => Ok(param_of(t)),
            Err(_) => {
                let lossy = String::from_utf8_lossy(token);
                let p = param_of(&lossy);
                if p.key.starts_with("bootlace.") {
                    Err(NotUtf8 {
                        key: p.key,
                        value: p.value.unwrap_or_default(),
                    })
                } else {
                    Ok(p)
                }
            }
        });
    }
    params
}

fn trim_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    b.get(n..).unwrap_or_default()
}

fn param_of(token: &str) -> Param {
    let token = strip_quotes(token);
    match token.split_once('=') {
        Some((key, value)) => Param {
            key: key.replace('"', ""),
            value: Some(strip_quotes(value).to_owned()),
        },
        None => Param {
            key: token.replace('"', ""),
            value: None,
        },
    }
}

fn strip_quotes(s: &str) -> &str {
    s.strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(s)
}

/// Error from [`split_command`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// A quote was opened and never closed.
    #[error("unterminated {0} quote")]
    Unterminated(char),
    /// The command has no words.
    #[error("empty command")]
    Empty,
}

/// Splits a command value such as `/bin/sh -c 'exit 7'` into argv words. Single and double
/// quotes group words (no escapes inside single quotes); a backslash outside single quotes
/// escapes the next character. No expansion of any kind is done.
pub fn split_command(value: &str) -> Result<Vec<String>, SplitError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => word.push(ch),
                        None => return Err(SplitError::Unterminated('\'')),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch) => word.push(ch),
                            None => return Err(SplitError::Unterminated('"')),
                        },
                        Some(ch) => word.push(ch),
                        None => return Err(SplitError::Unterminated('"')),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(ch) = chars.next() {
                    word.push(ch);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    if words.is_empty() {
        return Err(SplitError::Empty);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(key: &str, value: Option<&str>) -> Param {
        Param {
            key: key.to_owned(),
            value: value.map(str::to_owned),
        }
    }

    #[test]
    fn tokenises_like_the_kernel() {
        let cases: &[(&str, Vec<Param>)] = &[
            ("", vec![]),
            ("  quiet  ", vec![p("quiet", None)]),
            (
                "console=ttyS0 bootlace.log=debug quiet\n",
                vec![
                    p("console", Some("ttyS0")),
                    p("bootlace.log", Some("debug")),
                    p("quiet", None),
                ],
            ),
            (
                r#"bootlace.exec="/bin/sh -c 'exit 7'" panic=-1"#,
                vec![
                    p("bootlace.exec", Some("/bin/sh -c 'exit 7'")),
                    p("panic", Some("-1")),
                ],
            ),
            (
                r#""bootlace.exec=/a b" x"#,
                vec![p("bootlace.exec", Some("/a b")), p("x", None)],
            ),
            ("a=b=c", vec![p("a", Some("b=c"))]),
            (
                "root=/dev/vda -- single bootlace.log=debug",
                vec![p("root", Some("/dev/vda"))],
            ),
            ("a= b", vec![p("a", Some("")), p("b", None)]),
        ];
        for (line, want) in cases {
            assert_eq!(&parse(line), want, "line {line:?}");
        }
    }

    #[test]
    fn non_utf8_bytes_are_refused_only_in_bootlace_keys() {
        let line = b"console=ttyS0 FOO=\xff quiet bootlace.label=\xfe\xff bootlace.log=debug";
        let got = parse_bytes(line);
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], Ok(p("console", Some("ttyS0"))));
        assert_eq!(got[1], Ok(p("FOO", Some("\u{fffd}"))));
        assert_eq!(got[2], Ok(p("quiet", None)));
        let e = got[3].clone().expect_err("not UTF-8");
        assert_eq!(e.key, "bootlace.label");
        assert!(
            e.to_string()
                .contains("bootlace.label=: the value is not UTF-8"),
            "{e}"
        );
        assert_eq!(got[4], Ok(p("bootlace.log", Some("debug"))));
        // A non-UTF-8 byte after `--` is the real init's business.
        assert_eq!(parse_bytes(b"a -- \xff").len(), 1);
    }

    #[test]
    fn splits_commands() {
        let ok: &[(&str, &[&str])] = &[
            ("/sbin/init", &["/sbin/init"]),
            ("/bin/sh -c 'exit 7'", &["/bin/sh", "-c", "exit 7"]),
            (
                r#"/bin/echo "a \"b\"" c\ d"#,
                &["/bin/echo", "a \"b\"", "c d"],
            ),
            ("  /x   ''  ", &["/x", ""]),
        ];
        for (value, want) in ok {
            let want: Vec<String> = want.iter().map(|w| (*w).to_owned()).collect();
            assert_eq!(split_command(value), Ok(want), "{value:?}");
        }
        assert_eq!(split_command("   "), Err(SplitError::Empty));
        assert_eq!(split_command("/x 'a"), Err(SplitError::Unterminated('\'')));
        assert_eq!(split_command("/x \"a"), Err(SplitError::Unterminated('"')));
    }
}
