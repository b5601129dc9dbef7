//! Paths inside an image: the one normaliser (archive entries, `--init-path`, the bake's own
//! additions) and the two helpers every tree walk uses.

use std::fmt;

/// Whether a path given to [`normalise`] is relative to the image root (archive entries) or
/// absolute (`--init-path /sbin/bootlace-init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// A path in a tarball or a layer: a leading `/` is refused.
    Relative,
    /// A path in the booted image: it must start with `/`.
    Absolute,
}

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    /// The bytes are not UTF-8.
    #[error("the path is not UTF-8")]
    NotUtf8,
    /// A NUL byte.
    #[error("the path has a NUL byte")]
    Nul,
    /// A leading `/` where a path relative to the image root is expected.
    #[error("absolute paths are not allowed in a layer or tarball")]
    Absolute,
    /// No leading `/` where an absolute path is expected.
    #[error("not an absolute path")]
    NotAbsolute,
    /// A `..` component.
    #[error("`..` components are not allowed")]
    DotDot,
    /// A component longer than a file name can be.
    #[error("a component is over 255 bytes")]
    TooLong,
}

/// Normalises a path: `.` components, repeated and trailing `/` (and the leading `/` of an
/// [`Anchor::Absolute`] path) are dropped, giving `etc/passwd`; `Ok(None)` for the root itself
/// (`.`, `./`, and `/` alone in an archive).
/// Refused: non-UTF-8, NUL, `..`, a component over 255 bytes, and a path anchored the other way.
pub fn normalise(raw: &[u8], anchor: Anchor) -> Result<Option<String>, BadPath> {
    let s = std::str::from_utf8(raw).map_err(|_| BadPath::NotUtf8)?;
    if s.contains('\0') {
        return Err(BadPath::Nul);
    }
    let s = match (anchor, s.strip_prefix('/')) {
        // `/` alone names the root, as `./` does (umoci's `insert … /` writes such an entry);
        // it reaches nothing outside.
        (Anchor::Relative, Some(rest)) if rest.bytes().all(|b| b == b'/') => return Ok(None),
        (Anchor::Relative, Some(_)) => return Err(BadPath::Absolute),
        (Anchor::Relative, None) => s,
        (Anchor::Absolute, Some(rest)) => rest,
        (Anchor::Absolute, None) => return Err(BadPath::NotAbsolute),
    };
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(BadPath::DotDot),
            c if c.len() > 255 => return Err(BadPath::TooLong),
            c => parts.push(c),
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// `a/b/c` -> (`a/b`, `c`); `c` -> (``, `c`).
pub fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

/// `a/b` + `c` -> `a/b/c`; `` + `c` -> `c`.
pub fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}

/// A normalised path shown as the image sees it: `/etc/passwd`, `/` for the root.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_relative_and_absolute_paths() {
        let ok: &[(&str, Anchor, Option<&str>)] = &[
            ("./", Anchor::Relative, None),
            (".", Anchor::Relative, None),
            ("./etc/", Anchor::Relative, Some("etc")),
            ("etc//passwd", Anchor::Relative, Some("etc/passwd")),
            ("./a/./b", Anchor::Relative, Some("a/b")),
            ("usr/bin/..x", Anchor::Relative, Some("usr/bin/..x")),
            (
                "/sbin/bootlace-init",
                Anchor::Absolute,
                Some("sbin/bootlace-init"),
            ),
            ("//sbin/./x/", Anchor::Absolute, Some("sbin/x")),
            ("/", Anchor::Absolute, None),
            ("/", Anchor::Relative, None),
            ("//", Anchor::Relative, None),
        ];
        for (raw, anchor, want) in ok {
            assert_eq!(
                normalise(raw.as_bytes(), *anchor).expect(raw).as_deref(),
                *want,
                "{raw}"
            );
        }
        let bad: &[(&[u8], Anchor, BadPath)] = &[
            (b"/etc/passwd", Anchor::Relative, BadPath::Absolute),
            (b"../x", Anchor::Relative, BadPath::DotDot),
            (b"a/../../b", Anchor::Relative, BadPath::DotDot),
            (b"a/..", Anchor::Relative, BadPath::DotDot),
            (b"a\0b", Anchor::Relative, BadPath::Nul),
            (b"\xff", Anchor::Relative, BadPath::NotUtf8),
            (b"sbin/x", Anchor::Absolute, BadPath::NotAbsolute),
            (b"/sbin/../x", Anchor::Absolute, BadPath::DotDot),
        ];
        for (raw, anchor, want) in bad {
            assert_eq!(normalise(raw, *anchor), Err(want.clone()), "{raw:?}");
        }
        let long = format!("a/{}", "x".repeat(256));
        assert_eq!(
            normalise(long.as_bytes(), Anchor::Relative),
            Err(BadPath::TooLong)
        );
    }

    #[test]
    fn split_and_join() {
        assert_eq!(split("a/b/c"), ("a/b", "c"));
        assert_eq!(split("c"), ("", "c"));
        assert_eq!(join("", "c"), "c");
        assert_eq!(join("a/b", "c"), "a/b/c");
        assert_eq!(Shown("etc/x").to_string(), "/etc/x");
        assert_eq!(Shown("").to_string(), "/");
    }
}
