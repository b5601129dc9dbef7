//! The names of one directory, read whole and sorted, packed in one buffer: the walks of the
//! builder (staging, the initramfs writer, a directory's digest) list a directory before they
//! go through it in order, and what that costs is the size of the largest directory. Packed, a
//! name costs its bytes, a NUL and an offset (a 7-byte name: 16 bytes), not an allocation of
//! its own (about 50).

use std::cmp::Ordering;
use std::ffi::CStr;
use std::os::fd::AsFd;

use rustix::io::Errno;

/// A directory's names but `.` and `..`, in the order they were sorted in.
#[derive(Debug, Default)]
pub struct DirNames {
    /// Every name, each followed by a NUL.
    buf: Vec<u8>,
    /// Where each name starts in `buf`.
    starts: Vec<usize>,
}

impl DirNames {
    /// Reads the names of the open directory `dir`, in the order the filesystem gives them.
    pub fn read(dir: impl AsFd) -> Result<DirNames, Errno> {
        let mut names = DirNames::default();
        for entry in rustix::fs::Dir::read_from(dir)? {
            let entry = entry?;
            let n = entry.file_name().to_bytes_with_nul();
            if n == b".\0" || n == b"..\0" {
                continue;
            }
            names.starts.push(names.buf.len());
            names.buf.extend_from_slice(n);
        }
        names.buf.shrink_to_fit();
        names.starts.shrink_to_fit();
        Ok(names)
    }

    /// The name starting at `start` of `buf`.
    fn at(buf: &[u8], start: usize) -> &CStr {
        // Every name was pushed with its NUL.
        CStr::from_bytes_until_nul(buf.get(start..).unwrap_or_default()).unwrap_or_default()
    }

    /// Sorts the names by `cmp` on their bytes (without the NUL).
    pub fn sort_by(&mut self, mut cmp: impl FnMut(&[u8], &[u8]) -> Ordering) {
        let buf = &self.buf;
        self.starts
            .sort_by(|&a, &b| cmp(Self::at(buf, a).to_bytes(), Self::at(buf, b).to_bytes()));
    }

    /// Sorts the names by their bytes.
    pub fn sort(&mut self) {
        self.sort_by(|a, b| a.cmp(b));
    }

    /// How many names.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// The names, in order.
    pub fn iter(&self) -> impl Iterator<Item = &CStr> + '_ {
        self.starts.iter().map(|&s| Self::at(&self.buf, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sorted_without_dots() {
        let tmp = tempfile::tempdir().unwrap();
        for n in ["b", "a", ".wh.c", "ccc"] {
            std::fs::write(tmp.path().join(n), "").unwrap();
        }
        let dir = std::fs::File::open(tmp.path()).unwrap();
        let mut names = DirNames::read(&dir).unwrap();
        assert_eq!(names.len(), 4);
        names.sort();
        let got: Vec<&str> = names.iter().map(|n| n.to_str().unwrap()).collect();
        assert_eq!(got, [".wh.c", "a", "b", "ccc"]);
        names.sort_by(|a, b| b.cmp(a));
        let got: Vec<&str> = names.iter().map(|n| n.to_str().unwrap()).collect();
        assert_eq!(got, ["ccc", "b", "a", ".wh.c"]);
        let empty = tempfile::tempdir().unwrap();
        assert!(DirNames::read(std::fs::File::open(empty.path()).unwrap())
            .unwrap()
            .is_empty());
    }
}
