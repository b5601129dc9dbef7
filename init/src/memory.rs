//! The guest's memory as the kernel accounts it (`/proc/meminfo`), and how much of it a
//! bootstrap may take. A vsock bundle and what it unpacks to live in a tmpfs, which is memory
//! the kernel cannot reclaim: sized from what the guest really has, minus what the boot keeps
//! for itself, a bundle that does not fit is refused with a clear error instead of ending in the
//! OOM killer or a kernel panic ("System is deadlocked on memory").
//!
//! Every reading also records the lowest `MemAvailable` seen, from which the boot reports the
//! guest's peak memory use to the host.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// What the boot keeps for the kernel, the init and the manifest's commands, at least.
pub const MIN_RESERVE: u64 = 32 * 1024 * 1024;

/// The lowest `MemAvailable` read so far, in KiB (`u64::MAX`: none yet).
static LOW_WATER_KB: AtomicU64 = AtomicU64::new(u64::MAX);

/// `MemTotal` when it was last read, in KiB.
static TOTAL_KB: AtomicU64 = AtomicU64::new(0);

/// Two lines of `/proc/meminfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// `MemTotal`, in bytes.
    pub total: u64,
    /// `MemAvailable`, in bytes.
    pub available: u64,
}

impl MemInfo {
    /// Reads `/proc/meminfo` (and records the reading for [`peak_used_kb`]).
    pub fn read() -> std::io::Result<MemInfo> {
        let text = std::fs::read_to_string("/proc/meminfo")?;
        let m = MemInfo::parse(&text).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "/proc/meminfo has no MemTotal or MemAvailable",
            )
        })?;
        TOTAL_KB.store(m.total / 1024, Ordering::Relaxed);
        LOW_WATER_KB.fetch_min(m.available / 1024, Ordering::Relaxed);
        Ok(m)
    }

    /// Parses the text of `/proc/meminfo`.
    pub fn parse(text: &str) -> Option<MemInfo> {
        let field = |name: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb.saturating_mul(1024))
        };
        Some(MemInfo {
            total: field("MemTotal")?,
            available: field("MemAvailable")?,
        })
    }

    /// What the boot keeps for itself: an eighth of the memory, at least [`MIN_RESERVE`].
    pub fn reserve(&self) -> u64 {
        (self.total / 8).max(MIN_RESERVE)
    }

    /// What a bootstrap may hold in memory now: what is available less the reserve.
    pub fn budget(&self) -> u64 {
        self.available.saturating_sub(self.reserve())
    }
}

impl fmt::Display for MemInfo {
    /// `MemAvailable 201 MiB of 235 MiB, 32 MiB kept for the boot`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MemAvailable {} MiB of {} MiB, {} MiB kept for the boot",
            self.available >> 20,
            self.total >> 20,
            self.reserve() >> 20
        )
    }
}

/// `MemTotal` and the peak use seen (`MemTotal` less the lowest `MemAvailable` read), in KiB;
/// `None` before the first reading.
pub fn peak_used_kb() -> Option<(u64, u64)> {
    let low = LOW_WATER_KB.load(Ordering::Relaxed);
    let total = TOTAL_KB.load(Ordering::Relaxed);
    (low != u64::MAX && total > 0).then(|| (total, total.saturating_sub(low)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_meminfo_and_keeps_a_reserve() {
        let text = "MemTotal:         240000 kB\nMemFree:  1 kB\nMemAvailable:     200000 kB\n";
        let m = MemInfo::parse(text).expect("parses");
        assert_eq!(m.total, 240_000 * 1024);
        assert_eq!(m.available, 200_000 * 1024);
        assert_eq!(m.reserve(), MIN_RESERVE);
        assert_eq!(m.budget(), 200_000 * 1024 - MIN_RESERVE);
        assert_eq!(
            m.to_string(),
            "MemAvailable 195 MiB of 234 MiB, 32 MiB kept for the boot"
        );
        let big = MemInfo {
            total: 1 << 30,
            available: 900 << 20,
        };
        assert_eq!(big.reserve(), 128 << 20);
        let tight = MemInfo {
            total: 240 << 20,
            available: 20 << 20,
        };
        assert_eq!(tight.budget(), 0);
        assert!(MemInfo::parse("MemTotal: 1 kB\n").is_none());
    }
}
