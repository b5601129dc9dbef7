//! Target `manifest`: [`Manifest::parse`] and [`Manifest::read_from`] on arbitrary bytes.
//!
//! Never panics, and a manifest that is accepted is checked again here, independently of the
//! validation code, against what `docs/manifest.md` promises: every destination is absolute,
//! normalised (one leading `/`, no empty, `.` or `..` component, no NUL, at most 4095 bytes)
//! and not `/` nor under `/proc`, `/sys`, `/dev`, `/.bootstrap`; bundle sources are relative
//! and normalised; destinations are unique and no file or link is a parent of another entry;
//! mount points are unique; command names are unique, timeouts in 1..=86400, once-per-instance
//! commands have an instance id; modes fit in 0o7777. It also survives a TOML round trip.

use std::collections::BTreeSet;
use std::path::Path;

use bootlace_contract::manifest::{Frequency, Manifest, MAX_MANIFEST_BYTES, MAX_TIMEOUT_S};
use bootlace_contract::types::{FORBIDDEN_ROOTS, PATH_MAX};

/// The check.
pub fn run(data: &[u8]) {
    let name = Path::new("fuzz.toml");
    let from_reader = Manifest::read_from(data, name);
    match std::str::from_utf8(data) {
        Ok(text) => {
            let parsed = Manifest::parse(text, name);
            // Both entry points agree on what they accept.
            match (&parsed, &from_reader) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "parse and read_from disagree"),
                (Err(_), Err(_)) => {}
                (a, b) => panic!("parse and read_from disagree: {a:?} / {b:?}"),
            }
            if let Ok(m) = parsed {
                assert!(text.len() as u64 <= MAX_MANIFEST_BYTES);
                check(&m);
                round_trip(&m);
            }
        }
        Err(_) => assert!(
            from_reader.is_err(),
            "a manifest that is not UTF-8 was accepted"
        ),
    }
}

/// The properties of an accepted manifest.
pub fn check(m: &Manifest) {
    assert_eq!(m.version, 1);
    check_target(m.state_dir.as_str());
    let mut dests: Vec<(&str, bool)> = Vec::new();
    for d in &m.directories {
        check_target(d.path.as_str());
        assert!(d.mode.bits() <= 0o7777);
        dests.push((d.path.as_str(), true));
    }
    for f in &m.files {
        check_target(f.path.as_str());
        assert!(f.mode.bits() <= 0o7777);
        assert!(
            f.content.is_some() != f.source.is_some(),
            "{}: exactly one of content and source",
            f.path
        );
        if let Some(src) = &f.source {
            check_bundle_path(src.as_str());
        }
        dests.push((f.path.as_str(), false));
    }
    for s in &m.symlinks {
        check_target(s.path.as_str());
        assert!(!s.target.as_str().contains('\0'));
        dests.push((s.path.as_str(), false));
    }
    let unique: BTreeSet<&str> = dests.iter().map(|(p, _)| *p).collect();
    assert_eq!(unique.len(), dests.len(), "a destination appears twice");
    for (p, is_dir) in &dests {
        if *is_dir {
            continue;
        }
        for (q, _) in &dests {
            assert!(
                !q.strip_prefix(p).is_some_and(|r| r.starts_with('/')),
                "{q} is inside {p}, which is not a directory"
            );
        }
    }
    let mut mounts = BTreeSet::new();
    for mount in &m.mounts {
        check_target(mount.path().as_str());
        assert!(mounts.insert(mount.path().as_str()), "mounted twice");
        if let bootlace_contract::manifest::Mount::Bind(b) = mount {
            check_target(b.source.as_str());
        }
        if let bootlace_contract::manifest::Mount::Tmpfs(t) = mount {
            assert!(t.mode.is_none_or(|m| m.bits() <= 0o7777));
        }
    }
    let mut names = BTreeSet::new();
    for r in &m.run {
        assert!(
            names.insert(r.name.as_str()),
            "two commands named {}",
            r.name
        );
        assert!((1..=MAX_TIMEOUT_S).contains(&r.timeout_s));
        assert!(r.frequency != Frequency::OncePerInstance || m.instance_id.is_some());
        assert!(r.command.program().is_absolute());
        if r.cwd.as_str() != "/" {
            check_target(r.cwd.as_str());
        }
    }
    if let Some(c) = &m.handoff.command {
        assert!(c.program().is_absolute());
    }
    for key in m.sysctl.keys() {
        let p = key.proc_path();
        assert!(
            p.split('/').all(|c| !c.is_empty() && c != "." && c != ".."),
            "sysctl {p:?} leaves /proc/sys"
        );
    }
}

/// An absolute, normalised, changeable path: re-derived from the documentation, not from the
/// validation code.
pub fn check_target(p: &str) {
    let rel = p
        .strip_prefix('/')
        .unwrap_or_else(|| panic!("{p:?} is not absolute"));
    assert!(!rel.is_empty(), "the root itself is a target");
    assert!(p.len() <= PATH_MAX, "{p:?} is over PATH_MAX");
    check_components(p, rel);
    for forbidden in FORBIDDEN_ROOTS {
        assert!(
            !(p == *forbidden
                || p.strip_prefix(forbidden)
                    .is_some_and(|r| r.starts_with('/'))),
            "{p:?} is under {forbidden}"
        );
    }
    // The same path as the standard library normalises it.
    let normal: std::path::PathBuf = Path::new(p).components().collect();
    assert_eq!(normal.as_os_str(), p, "{p:?} is not normalised");
}

fn check_bundle_path(p: &str) {
    assert!(!p.starts_with('/') && !p.is_empty(), "bundle path {p:?}");
    check_components(p, p);
}

fn check_components(p: &str, rel: &str) {
    assert!(!p.contains('\0'), "{p:?} contains NUL");
    for c in rel.split('/') {
        assert!(
            !c.is_empty() && c != "." && c != ".." && c.len() <= 255,
            "{p:?} has a bad component {c:?}"
        );
    }
}

/// Serialising an accepted manifest gives a manifest that parses back to the same value.
fn round_trip(m: &Manifest) {
    let text = toml::to_string(m).unwrap_or_else(|e| panic!("{m:?} does not serialise: {e}"));
    let again = Manifest::parse(&text, Path::new("again.toml"))
        .unwrap_or_else(|e| panic!("{text:?} does not parse back: {e}"));
    assert_eq!(&again, m, "round trip changed the manifest");
}
