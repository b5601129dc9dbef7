//! Console logging for PID 1: one line per record on stderr (the kernel opens `/dev/console`
//! as init's stdio), stamped with CLOCK_BOOTTIME like the kernel's own lines:
//!
//! ```text
//! [    1.042311] bootlace: mounted /proc /sys /dev /run
//! [    1.050002] bootlace: error: config: unknown kernel command line key "bootlace.x"
//! ```
//!
//! A small writer rather than a logging crate: it is all PID 1 needs, with no dependency and
//! no allocation beyond the line itself, and each line goes out in one `write` so it does not
//! interleave with other writers on the console.

use std::io::Write;

use crate::sys;

/// The prefix of every console line the init writes.
pub const PREFIX: &str = "bootlace: ";

#[derive(Debug)]
struct ConsoleLogger;

static LOGGER: ConsoleLogger = ConsoleLogger;

impl log::Log for ConsoleLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => "error: ",
            log::Level::Warn => "warning: ",
            log::Level::Info => "",
            log::Level::Debug => "debug: ",
            log::Level::Trace => "trace: ",
        };
        line(&format!("{level}{}", record.args()));
    }

    fn flush(&self) {}
}

/// Writes one stamped, prefixed line to the console, bypassing the level filter.
pub fn line(msg: &str) {
    let t = sys::boottime();
    let text = format!(
        "[{:5}.{:06}] {PREFIX}{msg}\n",
        t.as_secs(),
        t.subsec_micros()
    );
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Installs the console logger at level `info`. Safe to call more than once.
pub fn install() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}
