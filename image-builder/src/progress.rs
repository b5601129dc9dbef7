//! Progress of long work (a bake, a bundle): the working code counts into a [`Progress`]
//! (the phase, entries and bytes done: atomics, no locking on the hot path) and, when a person
//! watches a terminal, a [`Ticker`] thread redraws one line on stderr about once a second:
//!
//! ```text
//! bootlace-image: stage: 31,204 entries, 412.5 MiB, 7 s
//! ```
//!
//! The library never decides to draw: the command line starts a ticker only when stderr is a
//! terminal and `--quiet` is not given.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the line is redrawn.
pub const TICK: Duration = Duration::from_secs(1);

/// Whether a ticker's line is on the terminal now (a [`note`] clears it first).
static LINE_SHOWN: AtomicBool = AtomicBool::new(false);

/// Counters of a long job.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    phase: Mutex<String>,
    entries: AtomicU64,
    bytes: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

/// What a [`Progress`] says at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The phase (`stage`, `image (mkfs.erofs)`, `hash`, …).
    pub phase: String,
    /// Entries done in this phase.
    pub entries: u64,
    /// Bytes done in this phase.
    pub bytes: u64,
    /// Time since the job started.
    pub elapsed: Duration,
}

impl Snapshot {
    /// The line a ticker draws: `stage: 31,204 entries, 412.5 MiB, 7 s`.
    pub fn line(&self) -> String {
        let mut s = self.phase.clone();
        let mut sep = ": ";
        if self.entries > 0 {
            s.push_str(sep);
            s.push_str(&format!("{} entries", grouped(self.entries)));
            sep = ", ";
        }
        if self.bytes > 0 {
            s.push_str(sep);
            s.push_str(&format!("{:.1} MiB", self.bytes as f64 / 1048576.0));
            sep = ", ";
        }
        s.push_str(sep);
        s.push_str(&format!("{} s", self.elapsed.as_secs()));
        s
    }
}

/// `1234567` -> `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Progress {
    /// Counters at zero, in no phase yet.
    pub fn new() -> Progress {
        Progress {
            started: Instant::now(),
            phase: Mutex::new(String::new()),
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// Starts a phase: its name is shown and the counters start again from zero.
    pub fn phase(&self, name: impl Into<String>) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = name.into();
        self.entries.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
    }

    /// Counts `n` more entries done.
    pub fn add_entries(&self, n: u64) {
        self.entries.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` more bytes done.
    pub fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets the bytes done (the size of an output a tool is writing).
    pub fn set_bytes(&self, n: u64) {
        self.bytes.store(n, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            phase: self
                .phase
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            entries: self.entries.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            elapsed: self.started.elapsed(),
        }
    }
}

/// A reader that counts the bytes read through it as progress.
#[derive(Debug)]
pub struct CountingReader<'a, R> {
    inner: R,
    progress: &'a Progress,
}

impl<'a, R> CountingReader<'a, R> {
    /// Wraps `inner`.
    pub fn new(inner: R, progress: &'a Progress) -> Self {
        CountingReader { inner, progress }
    }
}

impl<R: std::io::Read> std::io::Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.add_bytes(n as u64);
        Ok(n)
    }
}

/// Redraws the progress line on stderr every [`TICK`] until dropped; the line is cleared then.
#[derive(Debug)]
pub struct Ticker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Starts drawing `prefix` + the progress line (the first after one tick: short jobs
    /// print nothing).
    pub fn start(progress: Arc<Progress>, prefix: &'static str) -> Ticker {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                let line = progress.snapshot().line();
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[K{prefix}{line}");
                let _ = err.flush();
                LINE_SHOWN.store(true, Ordering::Relaxed);
            }
        });
        Ticker {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        clear_line();
    }
}

fn clear_line() {
    if LINE_SHOWN.swap(false, Ordering::Relaxed) {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K");
        let _ = err.flush();
    }
}

/// Prints a line on stderr, first clearing a progress line a [`Ticker`] drew (it is redrawn at
/// the next tick).
pub fn note(line: &str) {
    clear_line();
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let p = Progress::new();
        p.phase("stage");
        p.add_entries(31_204);
        p.add_bytes(412 * 1048576 + 524_288);
        let mut s = p.snapshot();
        s.elapsed = Duration::from_millis(7_400);
        assert_eq!(s.line(), "stage: 31,204 entries, 412.5 MiB, 7 s");
        p.phase("image (mkfs.erofs)");
        let mut s = p.snapshot();
        s.elapsed = Duration::from_secs(12);
        assert_eq!(s.line(), "image (mkfs.erofs): 12 s");
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
    }
}
