//! The contracts in docs/ stay true: every ```toml example in docs/manifest.md is a valid
//! manifest.

use std::path::Path;

use bootlace_contract::manifest::Manifest;

fn toml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn manifest_doc_examples_are_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/manifest.md");
    let text = std::fs::read_to_string(&path).expect("docs/manifest.md");
    let blocks = toml_blocks(&text);
    assert!(blocks.len() >= 2, "no examples found");
    for (i, b) in blocks.iter().enumerate() {
        Manifest::parse(b, Path::new("docs/manifest.md"))
            .unwrap_or_else(|e| panic!("example {i}: {e}"));
    }
}

#[test]
fn protocol_doc_frames_decode() {
    use bootlace_contract::protocol::{Decoder, Kind};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md");
    let text = std::fs::read_to_string(&path).expect("docs/protocol.md");
    let block = text
        .split("```frames\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a frames block");
    let mut d = Decoder::new();
    d.push(block.as_bytes());
    let mut kinds = Vec::new();
    while let Some(f) = d.next_frame().expect("valid frames") {
        kinds.push(f.kind);
    }
    assert_eq!(kinds, [Kind::Hello, Kind::Ready, Kind::Ack, Kind::Exit]);
    assert!(!d.is_mid_frame(), "trailing bytes in the example");
}
