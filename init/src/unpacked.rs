//! Whether the kernel unpacked the initramfs whole. A guest with too little memory for its
//! initramfs gets `Initramfs unpacking failed: write error` from the kernel, which then boots
//! on whatever was unpacked so far: bootlace must notice before it runs anything from it.
//!
//! Two signs, either enough: the kernel's own message in its log, and a marker file the image
//! builder writes as the archive's last entry (`[root] unpacked_marker` in init.toml) that is
//! missing. Both are looked at only when `/` is the kernel's rootfs (ramfs or tmpfs).

use std::io::Read;
use std::path::Path;

use crate::memory::MemInfo;
use crate::sys;

/// What the kernel prints when it could not unpack the whole initramfs.
const KERNEL_SAYS: &str = "Initramfs unpacking failed";

/// The initramfs was not unpacked whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the initramfs was not unpacked whole ({why}): the root is truncated; \
     give the guest more memory{}",
    memory
        .map(|m| format!(" (MemTotal {} MiB, MemAvailable {} MiB)", m.total >> 20, m.available >> 20))
        .unwrap_or_default()
)]
pub struct Truncated {
    /// The sign: the kernel's message, or the missing marker.
    pub why: String,
    /// The guest's memory, when known.
    pub memory: Option<MemInfo>,
}

/// Checks the root when it is an initramfs: the kernel's log (`kmsg`, read from its start)
/// must not report a failed unpack, and `marker` (when the config names one) must exist.
pub fn check(kmsg: &Path, marker: Option<&str>) -> Result<(), Truncated> {
    let magic = sys::fs_magic(Path::new("/")).unwrap_or(0);
    if magic != sys::magic::RAMFS && magic != sys::magic::TMPFS {
        return Ok(());
    }
    let why = kernel_says(kmsg).or_else(|| {
        marker
            .filter(|m| std::fs::symlink_metadata(m).is_err())
            .map(|m| format!("its last entry {m} is missing"))
    });
    match why {
        None => Ok(()),
        Some(why) => Err(Truncated {
            why,
            memory: MemInfo::read().ok(),
        }),
    }
}

/// The kernel's line about a failed initramfs unpack, if its log has one.
fn kernel_says(kmsg: &Path) -> Option<String> {
    let text = read_kmsg(kmsg);
    text.lines()
        .find_map(|l| l.find(KERNEL_SAYS).map(|i| l.get(i..).unwrap_or(l)))
        .map(|l| l.trim_end().to_owned())
}

/// The records of `/dev/kmsg` from the start of the kernel's ring buffer, without blocking
/// (empty when it cannot be read). Each read returns one record.
fn read_kmsg(kmsg: &Path) -> String {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(kmsg)
    else {
        return String::new();
    };
    let mut out = String::new();
    let mut buf = vec![0u8; 8192];
    // At most a few thousand records at boot; the cap keeps a flood from holding the boot.
    for _ in 0..100_000 {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.push_str(&String::from_utf8_lossy(buf.get(..n).unwrap_or_default()));
                if !out.ends_with('\n') {
                    out.push('\n');
                }
            }
            // EPIPE: a record was overwritten while reading; go on with the next.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::PIPE.raw_os_error()) => {}
            Err(_) => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_kernels_message() {
        let d = tempfile::tempdir().expect("tempdir");
        let log = d.path().join("kmsg");
        std::fs::write(
            &log,
            "6,120,1234,-;Trying to unpack rootfs image as initramfs...\n\
             3,121,1300,-;Initramfs unpacking failed: write error\n",
        )
        .expect("write");
        assert_eq!(
            kernel_says(&log).as_deref(),
            Some("Initramfs unpacking failed: write error")
        );
        std::fs::write(&log, "6,1,1,-;Freeing initrd memory: 2048K\n").expect("write");
        assert_eq!(kernel_says(&log), None);
        assert_eq!(kernel_says(&d.path().join("absent")), None);
        let t = Truncated {
            why: "its last entry /etc/bootlace/unpacked is missing".into(),
            memory: None,
        };
        assert_eq!(
            t.to_string(),
            "the initramfs was not unpacked whole (its last entry /etc/bootlace/unpacked is \
             missing): the root is truncated; give the guest more memory"
        );
    }
}
