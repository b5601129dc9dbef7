//! Finding an installed kernel: `$BOOTLACE_KERNEL`, else the newest `/boot/vmlinuz-*` that has
//! a module tree under `/lib/modules`.

use std::path::{Path, PathBuf};

/// An installed kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The image (`/boot/vmlinuz-<release>`).
    pub image: PathBuf,
    /// The release (`6.1.0-56-amd64`), which names its module tree.
    pub release: String,
}

/// Why no kernel was found.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// `$BOOTLACE_KERNEL` names a file that is not a `vmlinuz-<release>` or does not exist.
    #[error("BOOTLACE_KERNEL={0}: not an existing vmlinuz-<release> file")]
    BadOverride(String),
    /// Nothing usable in the boot directory.
    #[error("no vmlinuz-<release> with a module tree in {} (install one: make setup)", boot.display())]
    None {
        /// The directory searched.
        boot: PathBuf,
    },
}

/// Splits a version string into numeric and text runs so `6.1.0-10` sorts before `6.1.0-9`
/// correctly (numbers compare as numbers).
fn version_key(release: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut chars = release.chars().peekable();
    while chars.peek().is_some() {
        let digits: String = std::iter::from_fn(|| chars.next_if(char::is_ascii_digit)).collect();
        let text: String = std::iter::from_fn(|| chars.next_if(|c| !c.is_ascii_digit())).collect();
        key.push((digits.parse().unwrap_or(0), text));
    }
    key
}

/// Finds a kernel in `boot` whose module tree exists under `modules`.
pub fn find_in(boot: &Path, modules: &Path) -> Result<Kernel, KernelError> {
    let mut found: Vec<Kernel> = std::fs::read_dir(boot)
        .map_err(|_| KernelError::None {
            boot: boot.to_owned(),
        })?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let release = name.strip_prefix("vmlinuz-")?.to_owned();
            modules.join(&release).is_dir().then(|| Kernel {
                image: boot.join(&name),
                release,
            })
        })
        .collect();
    found.sort_by_key(|k| version_key(&k.release));
    found.pop().ok_or_else(|| KernelError::None {
        boot: boot.to_owned(),
    })
}

/// Finds the kernel to boot: `$BOOTLACE_KERNEL` if set, else the newest in `/boot`.
pub fn find() -> Result<Kernel, KernelError> {
    if let Ok(path) = std::env::var("BOOTLACE_KERNEL") {
        let p = PathBuf::from(&path);
        let release = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .map(str::to_owned);
        return match release {
            Some(release) if p.is_file() => Ok(Kernel { image: p, release }),
            _ => Err(KernelError::BadOverride(path)),
        };
    }
    find_in(Path::new("/boot"), Path::new("/lib/modules"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_kernel_with_modules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let boot = dir.path().join("boot");
        let mods = dir.path().join("modules");
        std::fs::create_dir_all(&boot).expect("mkdir");
        for r in ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.12.0-1-amd64"] {
            std::fs::write(boot.join(format!("vmlinuz-{r}")), b"k").expect("write");
        }
        std::fs::write(boot.join("config-6.1.0-10-amd64"), b"c").expect("write");
        for r in ["6.1.0-9-amd64", "6.1.0-10-amd64"] {
            std::fs::create_dir_all(mods.join(r)).expect("mkdir");
        }
        let k = find_in(&boot, &mods).expect("found");
        assert_eq!(k.release, "6.1.0-10-amd64");
        assert_eq!(k.image, boot.join("vmlinuz-6.1.0-10-amd64"));
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).expect("mkdir");
        assert!(find_in(&empty, &mods).is_err());
    }
}
