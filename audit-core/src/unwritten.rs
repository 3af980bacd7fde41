//! `unwritten.json`: what a stop could not write, told by the next start.
//!
//! A stop while the audit disk is full or read-only leaves records the writer holds but
//! cannot append. Their exchanges happened; the chain must say so. At every start the
//! writer reserves [`SIZE`] bytes in this file (spaces: nothing to tell); a stop that
//! still holds unwritten records writes a note over those bytes, which needs no new
//! block on a full disk. The next start turns a note into a `gap` event
//! (`reason = "unwritten_at_shutdown"`) at the head of its chain, then blanks the file.
//!
//! On a volume that is read-only at the stop nothing can be written at all: the count is
//! then in custody's log line and exit status only.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::Path,
};

use serde_json::Value;

pub const FILE: &str = "unwritten.json";
/// The reserved size; a note is a few hundred bytes.
pub const SIZE: usize = 4096;

/// The reserved file, kept open from start to stop.
pub struct Reserve {
    file: Option<File>,
}

impl Reserve {
    /// Opens the reservation (creating it) and returns the note a previous stop left.
    pub fn open(dir: &Path) -> (Self, Option<Value>) {
        let path = dir.join(FILE);
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path);
        let mut file = match file {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), "cannot reserve the unwritten-records note");
                return (Self { file: None }, None);
            }
        };
        let mut text = String::new();
        // Bounded: an edited file is read no further than the reservation.
        let _ = (&mut file).take(SIZE as u64).read_to_string(&mut text);
        let note = serde_json::from_str::<Value>(text.trim())
            .ok()
            .filter(Value::is_object);
        let mut reserve = Self { file: Some(file) };
        if let Err(e) = reserve.write(b"") {
            tracing::error!(error = %e, "cannot reserve the unwritten-records note");
        }
        (reserve, note)
    }

    /// Writes `note` over the reserved bytes and syncs it.
    pub fn record(&mut self, note: &Value) -> std::io::Result<()> {
        let text = note.to_string();
        if text.len() > SIZE {
            return Err(std::io::Error::other("note larger than its reservation"));
        }
        self.write(text.as_bytes())
    }

    fn write(&mut self, text: &[u8]) -> std::io::Result<()> {
        let Some(f) = self.file.as_mut() else {
            return Err(std::io::Error::other("no reservation"));
        };
        let mut buf = vec![b' '; SIZE];
        buf[..text.len()].copy_from_slice(text);
        buf[SIZE - 1] = b'\n';
        // An edited, longer file is cut back to the reservation.
        f.set_len(SIZE as u64)?;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&buf)?;
        f.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_survives_to_the_next_open_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, none) = Reserve::open(dir.path());
        assert!(none.is_none());
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE)).unwrap().len(),
            SIZE as u64
        );
        r.record(&serde_json::json!({"records": 3})).unwrap();
        drop(r);
        let (_, note) = Reserve::open(dir.path());
        assert_eq!(note.unwrap()["records"], 3);
        let (_, again) = Reserve::open(dir.path());
        assert!(again.is_none());
    }

    #[test]
    fn an_edited_or_huge_note_is_read_bounded_and_never_trusted_as_anything_but_an_object() {
        let dir = tempfile::tempdir().unwrap();
        for junk in [b"[1,2,3]".to_vec(), vec![b'{'; 1 << 20], vec![0xff; 10_000]] {
            std::fs::write(dir.path().join(FILE), &junk).unwrap();
            let (_, note) = Reserve::open(dir.path());
            assert!(note.is_none());
            let len = std::fs::metadata(dir.path().join(FILE)).unwrap().len();
            assert_eq!(len, SIZE as u64);
        }
    }
}
