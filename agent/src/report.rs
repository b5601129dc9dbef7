//! The stable console line that ends every boot, and the exit status it carries.
//!
//! Right before it powers the machine off, the init prints exactly one line:
//!
//! ```text
//! [    2.345678] bootlace: power-off EXIT_STATUS=7 STATUS=app /bin/sh exited with status 7
//! ```
//!
//! `EXIT_STATUS` follows the sd_notify vocabulary. Its value is, in order of precedence:
//! the supervised application's exit code; 128 + the signal number that killed it; 126 or 127
//! when the hand-off command cannot be executed (127: not found); 78 for a configuration error;
//! 71 for another failed boot step; 70 when the init itself failed (a panic).
//! Harnesses ([`parse_exit_status`]) read the status back from the console log.

/// Marker that precedes the status in the console line.
pub const MARKER: &str = "power-off EXIT_STATUS=";

/// The init itself failed (a panic): EX_SOFTWARE.
pub const STATUS_INTERNAL: u8 = 70;
/// A boot step failed (mount, module, device): EX_OSERR.
pub const STATUS_BOOT_STEP: u8 = 71;
/// The configuration was refused: EX_CONFIG.
pub const STATUS_CONFIG: u8 = 78;
/// The hand-off command exists but could not be executed.
pub const STATUS_CANNOT_EXEC: u8 = 126;
/// The hand-off command does not exist.
pub const STATUS_NOT_FOUND: u8 = 127;

/// Formats the power-off line (without the logger's stamp and prefix).
pub fn line(status: u8, summary: &str) -> String {
    format!(
        "{MARKER}{status} STATUS={}",
        summary.replace(['\n', '\r'], " ")
    )
}

/// The exit status of the last power-off line in a console log, if there is one.
pub fn parse_exit_status(console: &str) -> Option<u8> {
    console.lines().rev().find_map(|l| {
        let (_, rest) = l.rsplit_once(MARKER)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

/// The status for a child that was killed by signal `sig`.
pub fn signal_status(sig: i32) -> u8 {
    u8::try_from(128 + sig.clamp(0, 127)).unwrap_or(255)
}

/// The status for an exit code (the kernel keeps only the low 8 bits).
pub fn exit_code_status(code: i32) -> u8 {
    u8::try_from(code & 0xff).unwrap_or(255)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_last_status_line() {
        let cases: &[(&str, Option<u8>)] = &[
            ("", None),
            ("[ 1.0] bootlace: power-off EXIT_STATUS=7 STATUS=x\r\n", Some(7)),
            ("noise\n[ 1.0] bootlace: power-off EXIT_STATUS=0 STATUS=ok\nmore\n", Some(0)),
            (
                "bootlace: power-off EXIT_STATUS=1 STATUS=a\nbootlace: power-off EXIT_STATUS=137 STATUS=b\n",
                Some(137),
            ),
            ("bootlace: power-off EXIT_STATUS= STATUS=b\n", None),
            ("bootlace: power-off EXIT_STATUS=999\n", None),
        ];
        for (log, want) in cases {
            assert_eq!(parse_exit_status(log), *want, "{log:?}");
        }
    }

    #[test]
    fn formats_a_single_line() {
        assert_eq!(line(9, "a\nb"), "power-off EXIT_STATUS=9 STATUS=a b");
        assert_eq!(parse_exit_status(&line(78, "config")), Some(78));
        assert_eq!(signal_status(9), 137);
        assert_eq!(exit_code_status(256 + 3), 3);
    }
}
