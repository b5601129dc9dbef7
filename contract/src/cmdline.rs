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
    let mut params = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let mut in_quote = false;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            if c == '"' {
                in_quote = !in_quote;
            } else if c.is_whitespace() && !in_quote {
                end = i;
                break;
            }
        }
        let (token, tail) = rest.split_at(end);
        rest = tail.trim_start();
        if token == "--" {
            break;
        }
        params.push(param_of(token));
    }
    params
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
