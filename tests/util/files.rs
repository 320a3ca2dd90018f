//! Random files, comparing files, SHA-256.
//!
//! Tests build in the unoptimised `test` profile, where rand's ChaCha generator runs at about
//! 8 MB/s and sha2 at about 20 MB/s; so random bytes come from the kernel through
//! [`OsRng`] (getrandom(2)), and large files are compared byte for byte ([`assert_same_file`],
//! which is memcmp) rather than by hashing each copy.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};

const CHUNK: usize = 1 << 20;

/// Writes `size` random bytes to `path`, in 1 MiB chunks.
pub fn random_file(path: &Path, size: usize) {
    let mut out = BufWriter::with_capacity(CHUNK, File::create(path).expect("create file"));
    let mut chunk = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let n = left.min(CHUNK);
        OsRng.fill_bytes(&mut chunk[..n]);
        out.write_all(&chunk[..n]).expect("write file");
        left -= n;
    }
    out.flush().expect("flush file");
}

/// `size` random bytes.
pub fn random_bytes(size: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; size];
    for chunk in bytes.chunks_mut(CHUNK) {
        OsRng.fill_bytes(chunk);
    }
    bytes
}

/// Panics unless the files `copy` and `original` hold the same bytes; names the first
/// differing offset, or the sizes.
pub fn assert_same_file(copy: &Path, original: &Path) {
    let open = |p: &Path| File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut a, mut b) = (open(copy), open(original));
    let (len_a, len_b) = (a.metadata().unwrap().len(), b.metadata().unwrap().len());
    assert_eq!(
        len_a,
        len_b,
        "size of {} vs {}",
        copy.display(),
        original.display()
    );
    let (mut buf_a, mut buf_b) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut offset = 0u64;
    while offset < len_a {
        let n = (len_a - offset).min(CHUNK as u64) as usize;
        a.read_exact(&mut buf_a[..n]).expect("read copy");
        b.read_exact(&mut buf_b[..n]).expect("read original");
        if buf_a[..n] != buf_b[..n] {
            let at = (0..n).find(|&i| buf_a[i] != buf_b[i]).unwrap();
            panic!(
                "{} differs from {} at byte {}",
                copy.display(),
                original.display(),
                offset + at as u64
            );
        }
        offset += n as u64;
    }
}

/// The SHA-256 of a file's contents (hex). About 20 MB/s in a debug build.
pub fn sha256_file(path: &Path) -> String {
    let mut file =
        File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut hash = Sha256::new();
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut chunk).expect("read file");
        if n == 0 {
            break;
        }
        hash.update(&chunk[..n]);
    }
    hex(&hash.finalize())
}

/// The SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
