//! TensorBoard event files, written without TensorFlow: a file is a
//! sequence of TFRecords, each
//! `u64 length (LE) | masked crc32c(length) | data | masked crc32c(data)`,
//! whose data is a serialized `tensorflow.Event`:
//!
//! ```text
//! Event      { double wall_time = 1; int64 step = 2;
//!              oneof what { string file_version = 3; Summary summary = 5;
//!                           SessionLog session_log = 7; } }
//! Summary    { repeated Value value = 1; }
//! Value      { string tag = 1; float simple_value = 2; }
//! SessionLog { SessionStatus status = 1; }   // START = 1
//! ```
//!
//! The first record names the format (`brain.Event:2`); the others carry
//! scalars. TensorBoard reads every `*tfevents*` file of a directory, in
//! the order of their names, as one run. A session START at step N makes
//! TensorBoard drop what it read at steps N and later: a run that went back
//! to an earlier step (restarted from a checkpoint) writes one first, so the
//! curve follows the run that produced the parameters.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What the first record of every event file says.
pub const FILE_VERSION: &str = "brain.Event:2";

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), by table.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The CRC as TFRecords store it.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    // ((crc >> 15) | (crc << 17)) + 0xa282ead8
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// `data` framed as one TFRecord.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// What an event carries besides its time and step.
#[derive(Clone, Copy, Debug)]
pub enum EventBody<'a> {
    FileVersion(&'a str),
    /// (tag, value) pairs of one summary.
    Scalars(&'a [(&'a str, f32)]),
    /// `SessionLog { status: START }`.
    SessionStart,
}

/// A serialized `tensorflow.Event` (fields at their default value are left
/// out, as protobuf does).
pub fn encode_event(wall_time: f64, step: i64, body: EventBody<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    if wall_time != 0.0 {
        varint(&mut out, 1 << 3 | 1);
        out.extend_from_slice(&wall_time.to_le_bytes());
    }
    if step != 0 {
        varint(&mut out, 2 << 3);
        varint(&mut out, step as u64);
    }
    match body {
        EventBody::FileVersion(v) => bytes_field(&mut out, 3, v.as_bytes()),
        EventBody::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, value) in values {
                let mut v = Vec::new();
                bytes_field(&mut v, 1, tag.as_bytes());
                varint(&mut v, 2 << 3 | 5);
                v.extend_from_slice(&value.to_le_bytes());
                bytes_field(&mut summary, 1, &v);
            }
            bytes_field(&mut out, 5, &summary);
        }
        // status = START (1)
        EventBody::SessionStart => bytes_field(&mut out, 7, &[1 << 3, 1]),
    }
    out
}

/// Distinguishes the files one process opens within a second.
static FILES_OPENED: AtomicU64 = AtomicU64::new(0);

/// This machine's name as event file names carry it (`localhost` if unknown).
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .take(64)
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// One event file, appended through a buffer: call [`EventWriter::flush`]
/// to make what was written visible to readers.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new file `events.out.tfevents.<unix s>.<host>.<pid>.<n>` in `dir`
    /// (created if missing; never an existing file), starting with the
    /// file-version record. Names sort by creation time within a process.
    pub fn create(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let n = FILES_OPENED.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            "events.out.tfevents.{:010}.{}.{}.{n:06}",
            now.as_secs(),
            hostname(),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let mut w = Self {
            file: BufWriter::new(file),
            path,
        };
        w.write_event(now.as_secs_f64(), 0, EventBody::FileVersion(FILE_VERSION))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event of `values` at `step`.
    pub fn scalars(&mut self, wall_time: f64, step: i64, values: &[(&str, f32)]) -> io::Result<()> {
        self.write_event(wall_time, step, EventBody::Scalars(values))
    }

    /// A session START at `step`: readers drop what they hold at `step` and
    /// later (write it before going back to an earlier step).
    pub fn session_start(&mut self, wall_time: f64, step: i64) -> io::Result<()> {
        self.write_event(wall_time, step, EventBody::SessionStart)
    }

    fn write_event(&mut self, wall_time: f64, step: i64, body: EventBody<'_>) -> io::Result<()> {
        self.file
            .write_all(&record(&encode_event(wall_time, step, body)))
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// One scalar read back from an event file.
#[derive(Clone, Debug, PartialEq)]
pub struct Scalar {
    pub wall_time: f64,
    pub step: i64,
    pub tag: String,
    pub value: f32,
}

/// The records of an event file's bytes, their CRCs checked; a torn record
/// at the end (a writer mid-flush) ends the list.
pub fn read_records(bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 12 {
        let len_bytes = &bytes[at..at + 8];
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().map_err(|_| "short")?);
        if crc != masked_crc32c(len_bytes) {
            return Err(format!("record at byte {at}: bad length CRC"));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().map_err(|_| "short")?);
        let len = usize::try_from(len).map_err(|_| format!("record at byte {at}: too long"))?;
        let start = at + 12;
        let fits = |end: &usize| end.checked_add(4).is_some_and(|e| e <= bytes.len());
        let Some(end) = start.checked_add(len).filter(fits) else {
            break;
        };
        let data = &bytes[start..end];
        let crc = u32::from_le_bytes(bytes[end..end + 4].try_into().map_err(|_| "short")?);
        if crc != masked_crc32c(data) {
            return Err(format!("record at byte {at}: bad data CRC"));
        }
        out.push(data);
        at = end + 4;
    }
    Ok(out)
}

/// The fields of a protobuf message, as (field number, value): a varint, or
/// the bytes of a fixed-size or length-delimited field.
fn fields(mut msg: &[u8]) -> Result<Vec<(u64, Field<'_>)>, String> {
    fn take_varint(msg: &mut &[u8]) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = msg.split_first().ok_or("truncated varint")?;
            *msg = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    fn take<'a>(msg: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if msg.len() < n {
            return Err("truncated field".into());
        }
        let (a, b) = msg.split_at(n);
        *msg = b;
        Ok(a)
    }
    let mut out = Vec::new();
    while !msg.is_empty() {
        let key = take_varint(&mut msg)?;
        let field = match key & 7 {
            0 => Field::Varint(take_varint(&mut msg)?),
            1 => Field::Bytes(take(&mut msg, 8)?),
            2 => {
                let n = usize::try_from(take_varint(&mut msg)?).map_err(|_| "too long")?;
                Field::Bytes(take(&mut msg, n)?)
            }
            5 => Field::Bytes(take(&mut msg, 4)?),
            t => return Err(format!("wire type {t} not supported")),
        };
        out.push((key >> 3, field));
    }
    Ok(out)
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// A decoded `tensorflow.Event`.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub what: What,
}

#[derive(Clone, Debug, PartialEq)]
pub enum What {
    FileVersion(String),
    /// (tag, value) pairs of a summary's simple values.
    Scalars(Vec<(String, f32)>),
    SessionStart,
    /// Anything else (other session states, other event kinds).
    Other,
}

/// One serialized `Event`.
pub fn decode_event(event: &[u8]) -> Result<Event, String> {
    let mut e = Event {
        wall_time: 0.0,
        step: 0,
        what: What::Other,
    };
    for (n, f) in fields(event)? {
        match (n, f) {
            (1, Field::Bytes(b)) if b.len() == 8 => {
                wall_time_from(&mut e.wall_time, b)?;
            }
            (2, Field::Varint(v)) => e.step = v as i64,
            (3, Field::Bytes(v)) => e.what = What::FileVersion(String::from_utf8_lossy(v).into()),
            (5, Field::Bytes(summary)) => {
                let mut scalars = Vec::new();
                for (n, f) in fields(summary)? {
                    let (1, Field::Bytes(value)) = (n, f) else {
                        continue;
                    };
                    let (mut tag, mut simple) = (String::new(), None);
                    for (n, f) in fields(value)? {
                        match (n, f) {
                            (1, Field::Bytes(t)) => tag = String::from_utf8_lossy(t).into_owned(),
                            (2, Field::Bytes(b)) if b.len() == 4 => {
                                let b: [u8; 4] = b.try_into().map_err(|_| "simple_value")?;
                                simple = Some(f32::from_le_bytes(b));
                            }
                            _ => {}
                        }
                    }
                    if let Some(value) = simple {
                        scalars.push((tag, value));
                    }
                }
                e.what = What::Scalars(scalars);
            }
            (7, Field::Bytes(log)) => {
                let start = fields(log)?
                    .iter()
                    .any(|(n, f)| *n == 1 && matches!(f, Field::Varint(1)));
                e.what = if start {
                    What::SessionStart
                } else {
                    What::Other
                };
            }
            _ => {}
        }
    }
    Ok(e)
}

fn wall_time_from(out: &mut f64, b: &[u8]) -> Result<(), String> {
    let b: [u8; 8] = b.try_into().map_err(|_| "wall_time")?;
    *out = f64::from_le_bytes(b);
    Ok(())
}

/// Every event of an event file, in the order written.
pub fn read_events(path: &Path) -> io::Result<Vec<Event>> {
    let bytes = std::fs::read(path)?;
    let bad = |e: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    };
    read_records(&bytes)
        .map_err(bad)?
        .into_iter()
        .map(|r| decode_event(r).map_err(bad))
        .collect()
}

/// The event files of `dir`, in the order TensorBoard reads them (by name).
pub fn event_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains("tfevents"))
        {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The scalars of a directory as TensorBoard shows them: its event files
/// read in order, each session START dropping the scalars read before at
/// its step and later.
pub fn read_run(dir: &Path) -> io::Result<Vec<Scalar>> {
    let mut out: Vec<Scalar> = Vec::new();
    for file in event_files(dir)? {
        for e in read_events(&file)? {
            match e.what {
                What::SessionStart => out.retain(|s| s.step < e.step),
                What::Scalars(values) => {
                    out.extend(values.into_iter().map(|(tag, value)| Scalar {
                        wall_time: e.wall_time,
                        step: e.step,
                        tag,
                        value,
                    }));
                }
                What::FileVersion(_) | What::Other => {}
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    /// Bytes from TensorBoard's own protobuf classes and RecordWriter
    /// (tensorboard 2.21: `event_pb2.Event(...).SerializeToString()`).
    #[test]
    fn events_and_records_are_byte_for_byte_tensorboards() {
        assert_eq!(
            hex(&encode_event(
                1_700_000_000.5,
                0,
                EventBody::FileVersion(FILE_VERSION)
            )),
            "0900002040fc54d9411a0d627261696e2e4576656e743a32"
        );
        let event = encode_event(1_700_000_001.25, 7, EventBody::Scalars(&[("loss", 0.5)]));
        assert_eq!(
            hex(&event),
            "0900005040fc54d94110072a0d0a0b0a046c6f7373150000003f"
        );
        assert_eq!(
            hex(&record(&event)),
            "1a00000000000000129bd82d0900005040fc54d94110072a0d0a0b0a046c6f7373150000003f02181607"
        );
        // event_pb2.Event(..., session_log=SessionLog(status=SessionLog.START))
        assert_eq!(
            hex(&encode_event(1_700_000_002.0, 31, EventBody::SessionStart)),
            "0900008040fc54d941101f3a020801"
        );
    }

    #[test]
    fn a_written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("new");
        let mut w = EventWriter::create(&run).unwrap();
        w.scalars(10.5, 1, &[("loss", 2.25), ("samples_per_s", 1000.0)])
            .unwrap();
        w.scalars(11.0, 2, &[("loss", 2.0)]).unwrap();
        w.scalars(11.5, 3, &[("loss", 1.5), ("test_accuracy", 0.875)])
            .unwrap();
        w.flush().unwrap();
        let name = w.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let events = read_events(w.path()).unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].what, What::FileVersion(FILE_VERSION.into()));
        assert_eq!(
            events[3],
            Event {
                wall_time: 11.5,
                step: 3,
                what: What::Scalars(vec![("loss".into(), 1.5), ("test_accuracy".into(), 0.875)]),
            }
        );
        // A second file, back at step 2 (a rollback): TensorBoard drops the
        // first file's steps 2 and 3. Names sort in creation order.
        let mut w2 = EventWriter::create(&run).unwrap();
        assert!(w2.path() > w.path(), "{:?} {:?}", w2.path(), w.path());
        w2.session_start(12.0, 2).unwrap();
        w2.scalars(12.0, 2, &[("loss", 1.75)]).unwrap();
        w2.flush().unwrap();
        assert_eq!(read_events(w2.path()).unwrap()[1].what, What::SessionStart);
        let shown: Vec<(i64, String, f32)> = read_run(&run)
            .unwrap()
            .into_iter()
            .map(|s| (s.step, s.tag, s.value))
            .collect();
        assert_eq!(
            shown,
            [
                (1, "loss".into(), 2.25),
                (1, "samples_per_s".into(), 1000.0),
                (2, "loss".into(), 1.75),
            ]
        );
    }

    #[test]
    fn a_torn_tail_is_dropped_and_a_bad_crc_refused() {
        let event = encode_event(1.0, 2, EventBody::Scalars(&[("loss", 1.0)]));
        let mut bytes = record(&event);
        bytes.extend_from_slice(&record(&event)[..10]);
        assert_eq!(read_records(&bytes).unwrap(), [&event[..]]);
        let mut bad = record(&event);
        let last = bad.len() - 5;
        bad[last] ^= 1;
        assert!(read_records(&bad).unwrap_err().contains("CRC"));
    }
}
