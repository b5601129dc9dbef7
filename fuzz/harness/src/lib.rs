//! The checks behind bootlace's fuzz targets (`fuzz/`, cargo fuzz), in an ordinary crate so
//! that `cargo test` replays every committed corpus file through exactly the code the fuzzers
//! run (`tests/replay.rs`). Each target is one function taking the fuzzer's bytes; it panics
//! when a property fails, and is otherwise silent.
//!
//! Modules, one per target (`docs/fuzzing.md` says what each checks):
//! - [`manifest`]: manifest parse + validate; what is accepted is re-checked independently;
//! - [`confine`]: [`Root`](bootlace_init::sys::root::Root) operations on fuzzer-chosen paths in
//!   a tree with planted symlinks; a sentinel tree beside the root must not change;
//! - [`extract`]: bundle extraction into a root with a sentinel beside it;
//! - [`decompress`]: the capped gzip/zstd path of the extraction;
//! - [`frames`]: the protocol decoder, fed the same bytes in fuzzer-chosen splits;
//! - [`host_session`]: one guest session against the host side, then well-behaved ones;
//! - [`tree`]: snapshots of directory trees (the sentinel checks).
//!
//! The file-system targets need root (the extraction chowns to root), like the init's other
//! root-only tests.

pub mod confine;
pub mod decompress;
pub mod extract;
pub mod frames;
pub mod host_session;
pub mod manifest;
pub mod tree;

/// A target's check: the fuzzer's bytes in, a panic when a property fails.
pub type Check = fn(&[u8]);

/// Every target: its name (a directory under `fuzz/corpus/`) and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("manifest", manifest::run),
    ("confine", confine::run),
    ("extract", extract::run),
    ("decompress", decompress::run),
    ("frames", frames::run),
    ("host_session", host_session::run),
];

/// Reads a fuzzer's bytes as a stream of small decisions; past the end every byte is 0.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    /// The next byte (0 past the end).
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    /// The next `n` bytes (fewer at the end).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}
