//! The guest's memory and the images' least memory: a baked image's metadata may say how much
//! memory the guest needs to boot it (`min_memory_mib`, schema 2; an initramfs must fit in
//! memory twice over while the kernel unpacks it). A `--memory` given below it is refused; the
//! default is raised to it, with a warning.

use std::path::Path;

use bootlace_contract::image::{ImageMeta, MetaError};

/// The guest memory when none is asked for, in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 256;

/// What one image (the image booted, or its stage-1 initramfs) needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryNeed {
    /// The image, for messages (`name@version`).
    pub image: String,
    /// Its `min_memory_mib`.
    pub mib: u64,
}

impl MemoryNeed {
    /// The need an image's metadata records; `None` when it records none (schema 1).
    pub fn of(meta: &ImageMeta) -> Option<MemoryNeed> {
        meta.min_memory_mib.map(|mib| MemoryNeed {
            image: meta.id(),
            mib,
        })
    }
}

/// The need recorded in `FILE.meta.json` beside an image given by path (`--initrd FILE`,
/// `--stage1 FILE`): `Ok(None)` when there is no such file or it records no need (schema 1).
pub fn need_beside(image: &Path) -> Result<Option<MemoryNeed>, MetaError> {
    let meta_path = ImageMeta::path_for(image);
    match std::fs::symlink_metadata(&meta_path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => Ok(MemoryNeed::of(&ImageMeta::read(&meta_path)?)),
    }
}

/// The memory to give the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMemory {
    /// MiB.
    pub mib: u32,
    /// Set when the default was raised for an image: the warning to print.
    pub raised: Option<String>,
}

/// Why the guest cannot get the memory its images need.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// `--memory` was given below an image's need.
    #[error(
        "{image} needs at least {need} MiB of guest memory (min_memory_mib in its metadata); \
         --memory {given} is less: give --memory {need} or more, or leave it out"
    )]
    TooLittle {
        /// The image.
        image: String,
        /// Its need in MiB.
        need: u64,
        /// The memory given in MiB.
        given: u32,
    },
    /// The need is more than QEMU's `-m` can be given here.
    #[error("{image} needs {need} MiB of guest memory (min_memory_mib in its metadata), more than bootlace-vm can give ({} MiB)", u32::MAX)]
    TooMuch {
        /// The image.
        image: String,
        /// Its need in MiB.
        need: u64,
    },
}

/// The guest memory: `given` (`--memory`) when it covers every need, the default raised to
/// the largest need otherwise (with a warning), an error when `given` is below a need.
pub fn guest_memory(needs: &[MemoryNeed], given: Option<u32>) -> Result<GuestMemory, MemoryError> {
    let Some(most) = needs.iter().max_by_key(|n| n.mib) else {
        return Ok(GuestMemory {
            mib: given.unwrap_or(DEFAULT_MEMORY_MIB),
            raised: None,
        });
    };
    match given {
        Some(given) if u64::from(given) < most.mib => Err(MemoryError::TooLittle {
            image: most.image.clone(),
            need: most.mib,
            given,
        }),
        Some(given) => Ok(GuestMemory {
            mib: given,
            raised: None,
        }),
        None if most.mib <= u64::from(DEFAULT_MEMORY_MIB) => Ok(GuestMemory {
            mib: DEFAULT_MEMORY_MIB,
            raised: None,
        }),
        None => {
            let mib = u32::try_from(most.mib).map_err(|_| MemoryError::TooMuch {
                image: most.image.clone(),
                need: most.mib,
            })?;
            Ok(GuestMemory {
                mib,
                raised: Some(format!(
                    "raising the guest memory from the default {DEFAULT_MEMORY_MIB} MiB to \
                     {mib} MiB: {} needs that much (min_memory_mib in its metadata)",
                    most.image
                )),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metadata as a baker writes it, by hand: schema 2 with a need, or schema 1 without.
    fn meta(name: &str, min: Option<u64>) -> ImageMeta {
        let schema = if min.is_some() { 2 } else { 1 };
        let memory = match min {
            Some(m) => format!(",\n  \"unpacked_size\": 1000,\n  \"min_memory_mib\": {m}"),
            None => String::new(),
        };
        let text = format!(
            r#"{{
  "schema": {schema},
  "name": "{name}",
  "version": "1.0",
  "format": "initramfs",
  "file": "{name}.img",
  "sha256": "{}",
  "size": 10,
  "fstype": null,
  "label": null,
  "stage1": false,
  "read_only": false,
  "writable": [],
  "inputs": [],
  "init": {{ "path": "/sbin/bootlace-init", "version": "0", "sha256": "{}" }},
  "kernel_release": null,
  "modules": [],
  "source_date_epoch": 0,
  "built": "1970-01-01T00:00:00Z",
  "tool_versions": {{}}{memory}
}}"#,
            "ab".repeat(32),
            "00".repeat(32),
        );
        ImageMeta::from_json(text.as_bytes(), Path::new("hand-written.meta.json"))
            .unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// (the images' needs, `--memory`, the outcome)
    type Case = (
        Vec<MemoryNeed>,
        Option<u32>,
        Result<GuestMemory, MemoryError>,
    );

    #[test]
    fn a_given_memory_below_the_need_is_refused_the_default_is_raised() {
        let big = MemoryNeed::of(&meta("big", Some(600))).expect("a need");
        assert_eq!(
            big,
            MemoryNeed {
                image: "big@1.0".to_owned(),
                mib: 600
            }
        );
        assert_eq!(
            MemoryNeed::of(&meta("old", None)),
            None,
            "schema 1: no need"
        );
        let small = MemoryNeed::of(&meta("small", Some(96))).expect("a need");
        let ok = |mib| GuestMemory { mib, raised: None };
        let cases: Vec<Case> = vec![
            (vec![], None, Ok(ok(256))),
            (vec![], Some(64), Ok(ok(64))),
            (vec![small.clone()], None, Ok(ok(256))),
            (vec![small.clone()], Some(96), Ok(ok(96))),
            (vec![big.clone()], Some(600), Ok(ok(600))),
            (vec![big.clone()], Some(1024), Ok(ok(1024))),
            (
                vec![small.clone()],
                Some(95),
                Err(MemoryError::TooLittle {
                    image: "small@1.0".to_owned(),
                    need: 96,
                    given: 95,
                }),
            ),
            (
                vec![small.clone(), big.clone()],
                Some(512),
                Err(MemoryError::TooLittle {
                    image: "big@1.0".to_owned(),
                    need: 600,
                    given: 512,
                }),
            ),
            (
                vec![big.clone(), small.clone()],
                None,
                Ok(GuestMemory {
                    mib: 600,
                    raised: Some(
                        "raising the guest memory from the default 256 MiB to 600 MiB: \
                         big@1.0 needs that much (min_memory_mib in its metadata)"
                            .to_owned(),
                    ),
                }),
            ),
        ];
        for (needs, given, want) in cases {
            assert_eq!(guest_memory(&needs, given), want, "{needs:?} {given:?}");
        }
        let e = guest_memory(&[small], Some(64)).expect_err("too little");
        assert_eq!(
            e.to_string(),
            "small@1.0 needs at least 96 MiB of guest memory (min_memory_mib in its \
             metadata); --memory 64 is less: give --memory 96 or more, or leave it out"
        );
        let huge = MemoryNeed {
            image: "huge@1".to_owned(),
            mib: 1 << 40,
        };
        assert!(matches!(
            guest_memory(&[huge], None),
            Err(MemoryError::TooMuch { .. })
        ));
    }

    #[test]
    fn the_need_of_an_initrd_comes_from_the_metadata_beside_it() {
        let d = tempfile::tempdir().expect("tempdir");
        let img = d.path().join("app.img");
        std::fs::write(&img, b"not really an initramfs").expect("write");
        assert_eq!(need_beside(&img).expect("no metadata"), None);
        let beside = d.path().join("app.img.meta.json");
        std::fs::write(&beside, meta("app", Some(384)).to_json()).expect("write");
        assert_eq!(
            need_beside(&img).expect("metadata"),
            Some(MemoryNeed {
                image: "app@1.0".to_owned(),
                mib: 384
            })
        );
        std::fs::write(&beside, meta("app", None).to_json()).expect("write");
        assert_eq!(need_beside(&img).expect("schema 1"), None);
        std::fs::write(&beside, b"{").expect("write");
        let e = need_beside(&img).expect_err("broken");
        assert!(e.to_string().contains("app.img.meta.json"), "{e}");
    }
}
