//! One input through one fuzz target's check, for a crash file outside the corpus:
//! `cargo run -p bootlace-fuzz-harness --example replay-one -- confine fuzz/artifacts/confine/crash-…`
//! (as root for `confine` and `extract`). Exits 0 when the check passes; a failing check panics
//! with its message.

use std::process::ExitCode;

use bootlace_fuzz_harness::TARGETS;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    let (Some(target), Some(input), None) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!(
            "usage: replay-one TARGET INPUT   (targets: {})",
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    let Some(check) = TARGETS.iter().find(|(n, _)| n == target).map(|(_, f)| *f) else {
        eprintln!(
            "replay-one: no target {target:?} (targets: {})",
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    let data = match std::fs::read(input) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("replay-one: cannot read {input}: {e}");
            return ExitCode::FAILURE;
        }
    };
    check(&data);
    println!("{target}: {input}: the check passes");
    ExitCode::SUCCESS
}
