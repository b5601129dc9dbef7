//! A directory of built images: finding one by name and version through the metadata files
//! `bootlace-image bake` writes beside each output (`<file>.meta.json`), checking its sha256,
//! and falling back to the default version, with a warning, when the requested one is missing
//! or damaged.
//!
//! The default version of `NAME` is the one written in `DIR/NAME.default` when that file
//! exists, else the highest version (numeric parts compared as numbers: `1.10` > `1.9`).

use std::path::{Path, PathBuf};

pub use bootlace_contract::image::ImageMeta;
use bootlace_contract::image::SUFFIX as META_SUFFIX;

/// Why no image could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    /// The directory could not be listed.
    #[error("cannot list {}", dir.display())]
    List {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No usable image of that name.
    #[error("no usable image {name:?} in {}: {why}", dir.display())]
    NotFound {
        /// The directory.
        dir: PathBuf,
        /// The name asked for.
        name: String,
        /// What was tried.
        why: String,
    },
    /// A metadata field has a value booting cannot use.
    #[error("{}: {why}", meta.display())]
    Bad {
        /// The metadata file.
        meta: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// One image of the directory.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its metadata file.
    pub meta_path: PathBuf,
    /// Its metadata.
    pub meta: ImageMeta,
}

impl Entry {
    /// The image file.
    pub fn path(&self) -> PathBuf {
        self.meta_path
            .parent()
            .unwrap_or(Path::new("."))
            .join(&self.meta.file)
    }

    /// Checks the image file against the recorded sha256 and size.
    pub fn verify(&self) -> Result<(), Damaged> {
        let path = self.path();
        let io = |source| Damaged::Unreadable {
            path: path.clone(),
            source,
        };
        let f = std::fs::File::open(&path).map_err(io)?;
        let (got, size) =
            bootlace_contract::digest::of_reader(std::io::BufReader::with_capacity(1 << 20, f))
                .map_err(io)?;
        if !got.matches_hex(&self.meta.sha256) {
            return Err(Damaged::Digest {
                path,
                got: got.hex().to_owned(),
                want: self.meta.sha256.clone(),
            });
        }
        if size != self.meta.size {
            return Err(Damaged::Size {
                path,
                got: size,
                want: self.meta.size,
            });
        }
        Ok(())
    }
}

/// An image file that does not match its metadata.
#[derive(Debug, thiserror::Error)]
pub enum Damaged {
    /// It cannot be read.
    #[error("cannot read {}", path.display())]
    Unreadable {
        /// The image file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Its sha256 is not the recorded one.
    #[error("{} has sha256 {got}, its metadata says {want}", path.display())]
    Digest {
        /// The image file.
        path: PathBuf,
        /// What it has.
        got: String,
        /// What the metadata says.
        want: String,
    },
    /// Its size is not the recorded one.
    #[error("{} has {got} bytes, its metadata says {want}", path.display())]
    Size {
        /// The image file.
        path: PathBuf,
        /// What it has.
        got: u64,
        /// What the metadata says.
        want: u64,
    },
}

/// The images of `dir` (every `*.meta.json` that parses; the others are returned as
/// warnings, naming the file).
pub fn catalog(dir: &Path) -> Result<(Vec<Entry>, Vec<String>), ImagesError> {
    let list = std::fs::read_dir(dir).map_err(|source| ImagesError::List {
        dir: dir.to_owned(),
        source,
    })?;
    let mut entries = Vec::new();
    let mut warnings = Vec::new();
    let mut names: Vec<PathBuf> = list
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(META_SUFFIX))
        })
        .collect();
    names.sort();
    for meta_path in names {
        match ImageMeta::read(&meta_path) {
            Ok(meta) => entries.push(Entry { meta_path, meta }),
            Err(e) => warnings.push(format!("{}; skipped", bootlace_contract::chain(&e))),
        }
    }
    Ok((entries, warnings))
}

pub use bootlace_contract::image::compare_versions;

/// The image chosen to boot, and the warnings met on the way.
#[derive(Debug, Clone)]
pub struct Chosen {
    /// The image.
    pub entry: Entry,
    /// Each fallback and skipped file, in words.
    pub warnings: Vec<String>,
}

/// Picks `name` at `version` (or its default version) from `dir`, verifying its sha256. A
/// missing or damaged requested version falls back to the default version, with a warning; a
/// damaged default is an error. Stage-1 initramfs images are never chosen by name.
pub fn choose(dir: &Path, name: &str, version: Option<&str>) -> Result<Chosen, ImagesError> {
    let (entries, mut warnings) = catalog(dir)?;
    let of_name: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.meta.name == name && !e.meta.stage1)
        .collect();
    let not_found = |why: String| ImagesError::NotFound {
        dir: dir.to_owned(),
        name: name.to_owned(),
        why,
    };
    if of_name.is_empty() {
        let mut known: Vec<String> = entries.iter().map(|e| e.meta.id()).collect();
        known.dedup();
        return Err(not_found(if known.is_empty() {
            "the directory has no image metadata".to_owned()
        } else {
            format!("it has {}", known.join(", "))
        }));
    }
    if let Some(v) = version {
        match of_name.iter().find(|e| e.meta.version == v) {
            Some(e) => match e.verify() {
                Ok(()) => {
                    return Ok(Chosen {
                        entry: (*e).clone(),
                        warnings,
                    })
                }
                Err(why) => {
                    warnings.push(format!("{name}@{v}: {}", bootlace_contract::chain(&why)))
                }
            },
            None => warnings.push(format!("{name}@{v}: no such version in {}", dir.display())),
        }
    }
    let default = default_version(dir, name, &of_name)?;
    let entry = of_name
        .iter()
        .find(|e| e.meta.version == default)
        .ok_or_else(|| not_found(format!("its default version {default} has no metadata")))?;
    entry.verify().map_err(|why| {
        not_found(format!(
            "default version {default}: {}",
            bootlace_contract::chain(&why)
        ))
    })?;
    if let Some(v) = version {
        warnings.push(format!(
            "booting the default version {name}@{default} instead of {v}"
        ));
    }
    Ok(Chosen {
        entry: (*entry).clone(),
        warnings,
    })
}

fn default_version(dir: &Path, name: &str, of_name: &[&Entry]) -> Result<String, ImagesError> {
    let pin = dir.join(format!("{name}.default"));
    match std::fs::read_to_string(&pin) {
        Ok(text) => return Ok(text.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(ImagesError::Bad {
                meta: pin,
                why: e.to_string(),
            })
        }
    }
    of_name
        .iter()
        .map(|e| e.meta.version.clone())
        .max_by(|a, b| compare_versions(a, b))
        .ok_or_else(|| ImagesError::NotFound {
            dir: dir.to_owned(),
            name: name.to_owned(),
            why: "no versions".to_owned(),
        })
}

/// The newest stage-1 initramfs of `dir` that verifies.
pub fn stage1(dir: &Path) -> Result<Entry, ImagesError> {
    let (mut entries, _) = catalog(dir)?;
    entries.retain(|e| e.meta.stage1);
    entries.sort_by(|a, b| compare_versions(&b.meta.version, &a.meta.version));
    let mut why = Vec::new();
    for e in entries {
        match e.verify() {
            Ok(()) => return Ok(e),
            Err(w) => why.push(bootlace_contract::chain(&w)),
        }
    }
    Err(ImagesError::NotFound {
        dir: dir.to_owned(),
        name: "(stage 1)".to_owned(),
        why: if why.is_empty() {
            "no stage-1 initramfs (bake one with --format initramfs --stage1)".to_owned()
        } else {
            why.join("; ")
        },
    })
}

/// The kernel parameter that tells stage 1 where this disk image's root is: its label, or
/// `/dev/vda` (the harness attaches the root first) for filesystems without one.
pub fn root_param(meta: &ImageMeta) -> String {
    match &meta.label {
        Some(l) if !l.is_empty() => format!("bootlace.root=LABEL={l}"),
        _ => "bootlace.root=/dev/vda".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        let mut v = vec!["1.10", "1.9", "1.9.1", "2", "1.0-rc1", "1.0", "0"];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(v, ["0", "1.0", "1.0-rc1", "1.9", "1.9.1", "1.10", "2"]);
        assert_eq!(compare_versions("01", "1"), std::cmp::Ordering::Equal);
    }

    fn write_image(dir: &Path, name: &str, version: &str, body: &[u8], stage1: bool) {
        use bootlace_contract::image::{Format, InitInfo};
        let file = format!("{name}-{version}.img");
        std::fs::write(dir.join(&file), body).expect("write");
        let meta = ImageMeta {
            schema: bootlace_contract::image::SCHEMA,
            name: name.to_owned(),
            version: version.to_owned(),
            format: Format::Initramfs,
            file: file.clone(),
            sha256: bootlace_contract::digest::of_bytes(body).hex().to_owned(),
            size: body.len() as u64,
            fstype: None,
            label: None,
            stage1,
            read_only: false,
            writable: Vec::new(),
            inputs: Vec::new(),
            init: InitInfo {
                path: "/sbin/bootlace-init".to_owned(),
                version: "0".to_owned(),
                sha256: "00".repeat(32),
            },
            kernel_release: None,
            modules: Vec::new(),
            source_date_epoch: 0,
            built: bootlace_contract::image::rfc3339(0),
            tool_versions: Default::default(),
            unpacked_size: None,
            min_memory_mib: None,
            parent: None,
            bundle: None,
            disk: None,
        };
        std::fs::write(dir.join(format!("{file}{META_SUFFIX}")), meta.to_json()).expect("write");
    }

    #[test]
    fn chooses_and_falls_back() {
        let d = tempfile::tempdir().expect("tempdir");
        write_image(d.path(), "base", "1.9", b"one-nine", false);
        write_image(d.path(), "base", "1.10", b"one-ten", false);
        write_image(d.path(), "base", "2.0", b"two", false);
        write_image(d.path(), "s1", "1", b"stage", true);
        std::fs::write(d.path().join("junk.meta.json"), b"{").expect("write");

        let c = choose(d.path(), "base", Some("1.9")).expect("exact");
        assert_eq!(c.entry.meta.version, "1.9");
        assert_eq!(c.warnings.len(), 1, "the junk file: {:?}", c.warnings);

        let c = choose(d.path(), "base", None).expect("default");
        assert_eq!(c.entry.meta.version, "2.0");

        // Missing version -> default, with a warning that names both.
        let c = choose(d.path(), "base", Some("3.0")).expect("fallback");
        assert_eq!(c.entry.meta.version, "2.0");
        let all = c.warnings.join("\n");
        assert!(all.contains("base@3.0: no such version"), "{all}");
        assert!(
            all.contains("default version base@2.0 instead of 3.0"),
            "{all}"
        );

        // Damaged version -> default.
        std::fs::write(d.path().join("base-1.10.img"), b"tampered").expect("write");
        let c = choose(d.path(), "base", Some("1.10")).expect("fallback");
        assert_eq!(c.entry.meta.version, "2.0");
        assert!(
            c.warnings.join("\n").contains("has sha256"),
            "{:?}",
            c.warnings
        );

        // A pinned default wins over the highest version.
        std::fs::write(d.path().join("base.default"), "1.9\n").expect("write");
        let c = choose(d.path(), "base", Some("1.10")).expect("fallback");
        assert_eq!(c.entry.meta.version, "1.9");

        // A damaged default is an error, not a silent boot of something else.
        std::fs::write(d.path().join("base-1.9.img"), b"bad").expect("write");
        let e = choose(d.path(), "base", None).expect_err("damaged default");
        assert!(e.to_string().contains("default version 1.9"), "{e}");

        let e = choose(d.path(), "nope", None).expect_err("unknown");
        assert!(e.to_string().contains("base@"), "{e}");
        assert!(
            choose(d.path(), "s1", None).is_err(),
            "stage 1 is not chosen by name"
        );
        assert_eq!(stage1(d.path()).expect("stage1").meta.name, "s1");
    }
}
