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

/// An exit status a guest reports (`EXIT_STATUS=` on the console and to the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// The supervised application exited with this code.
    Exited(u8),
    /// The supervised application was killed by this signal (reported as 128 + the signal).
    Signaled(i32),
    /// The init itself failed (a panic): 70, EX_SOFTWARE.
    Internal,
    /// A boot step failed (mount, module, device, host, bootstrap): 71, EX_OSERR.
    BootStep,
    /// The configuration or the manifest was refused: 78, EX_CONFIG.
    Config,
    /// The hand-off command exists but could not be executed: 126.
    CannotExec,
    /// The hand-off command does not exist: 127.
    NotFound,
}

impl ExitStatus {
    /// The number reported.
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled(sig) => u8::try_from(128 + sig.clamp(0, 127)).unwrap_or(255),
            ExitStatus::Internal => 70,
            ExitStatus::BootStep => 71,
            ExitStatus::Config => 78,
            ExitStatus::CannotExec => 126,
            ExitStatus::NotFound => 127,
        }
    }

    /// The status of an exit code (the kernel keeps only the low 8 bits).
    pub fn from_exit_code(code: i32) -> ExitStatus {
        ExitStatus::Exited(u8::try_from(code & 0xff).unwrap_or(255))
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.code())
    }
}

/// Formats the power-off line (without the logger's stamp and prefix).
pub fn line(status: ExitStatus, summary: &str) -> String {
    format!(
        "{MARKER}{status} STATUS={}",
        summary.replace(['\n', '\r'], " ")
    )
}

/// The last power-off line of a console log, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerOff {
    /// `EXIT_STATUS=`.
    pub exit_status: u8,
    /// `STATUS=`: the one-line summary after it (empty when the line has none).
    pub status: String,
}

/// The last power-off line in a console log, if there is one.
pub fn parse_power_off(console: &str) -> Option<PowerOff> {
    console.lines().rev().find_map(|l| {
        let (_, rest) = l.rsplit_once(MARKER)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let exit_status = digits.parse().ok()?;
        let status = rest
            .get(digits.len()..)
            .and_then(|r| r.strip_prefix(" STATUS="))
            .unwrap_or("")
            .trim_end_matches('\r')
            .to_owned();
        Some(PowerOff {
            exit_status,
            status,
        })
    })
}

/// The exit status of the last power-off line in a console log, if there is one.
pub fn parse_exit_status(console: &str) -> Option<u8> {
    parse_power_off(console).map(|p| p.exit_status)
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
        assert_eq!(
            parse_power_off("x\n[ 1.0] bootlace: power-off EXIT_STATUS=7 STATUS=app exited\r\n"),
            Some(PowerOff {
                exit_status: 7,
                status: "app exited".to_owned()
            })
        );
        assert_eq!(
            parse_power_off("bootlace: power-off EXIT_STATUS=3").map(|p| p.status),
            Some(String::new())
        );
    }

    #[test]
    fn formats_a_single_line() {
        assert_eq!(
            line(ExitStatus::Exited(9), "a\nb"),
            "power-off EXIT_STATUS=9 STATUS=a b"
        );
        assert_eq!(
            parse_exit_status(&line(ExitStatus::Config, "config")),
            Some(78)
        );
        assert_eq!(ExitStatus::Signaled(9).code(), 137);
        assert_eq!(ExitStatus::from_exit_code(256 + 3).code(), 3);
        assert_eq!(ExitStatus::Config.code(), 78);
        assert_eq!(ExitStatus::NotFound.to_string(), "127");
    }
}
