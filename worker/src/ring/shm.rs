//! Same-host ring links through shared memory.
//!
//! Two ranks on one host (several GPUs per machine, or several ranks on a
//! many-core CPU) pay twice for loopback TCP: the kernel copies every byte
//! in and out of a socket and runs the TCP stack over it, and that CPU time
//! is taken from training. Like NCCL's SHM transport, a link whose two ends
//! share a host and a network namespace moves its frames through a mapped
//! file instead; sealing writes straight into it and opening reads straight
//! out of it, so the crypto pass doubles as the only copy.
//!
//! **Setup.** After the authenticated TCP handshake the dialer (the
//! sender) offers a fresh file in `/dev/shm` (0600, random name, a random
//! token inside) and its network namespace. The acceptor takes it only if it
//! is in the same namespace (so an emulated multi-host lab, one namespace per
//! rank, stays on its emulated links), the file is its own user's, of the
//! right size, and holds the offered token; then it answers, and the dialer
//! unlinks the file (both ends keep it mapped). Anything else stays on TCP.
//! The offer itself is not sealed: a forged offer or answer can only make a
//! link fall back to TCP or stall into the ring timeout, like cutting the
//! connection would; every frame is still sealed with the link's session key.
//!
//! **Data.** A single-producer single-consumer ring of [`SLOTS`] slots, each
//! one batch of sealed pieces (the frame header rides in a frame's first
//! slot). The TCP connection stays open as the doorbell: a side about to
//! sleep raises its flag and blocks reading one byte; the other side, after
//! publishing, takes the flag and writes that byte. Exactly one byte per
//! taken flag, so none pile up. A dead or aborted neighbour closes the socket,
//! which ends any wait at once; a silent one hits the socket's read timeout.

#![allow(unsafe_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use ringtrain_common::wire::FrameHeader;

use super::secure::{piece_range, LinkCipher, MAX_TAG_LEN, PIECE_BYTES};
use super::transport::{receiving, sending, FrameReceiver, FrameSender};
use super::{Peer, RingError};

/// Sealed pieces per slot (and per TCP write when on TCP).
pub const BATCH_PIECES: usize = 4;
/// Slots in a link's ring: enough to keep the sender a few batches ahead.
pub const SLOTS: u64 = 8;
const CONTROL_BYTES: usize = 4096;
/// A slot's own header: the bytes used, then padding to a cache line.
const SLOT_HEADER: usize = 64;
const SLOT_BYTES: usize =
    (SLOT_HEADER + FrameHeader::LEN + BATCH_PIECES * (PIECE_BYTES + MAX_TAG_LEN))
        .next_multiple_of(4096);
/// Size of the shared file.
pub const MAP_BYTES: usize = CONTROL_BYTES + SLOTS as usize * SLOT_BYTES;
const MAGIC: u64 = 0x5254_5348_4d31_0000; // "RTSHM1"
const TOKEN_LEN: usize = 32;
// Offsets in the control page, each counter on its own cache line.
const AT_MAGIC: usize = 0;
const AT_TOKEN: usize = 8;
const AT_WRITTEN: usize = 64;
const AT_READ: usize = 128;
const AT_DATA_WAITING: usize = 192;
const AT_SPACE_WAITING: usize = 256;
/// Yields before sleeping on the doorbell: the other side is usually
/// a slot away, and a sleep costs two context switches.
const YIELDS: usize = 4;

/// A mapping of one link's shared file (unmapped on drop).
pub struct Mapping {
    base: *mut u8,
}

// SAFETY: the mapping is plain shared memory; every access to what both
// processes touch goes through atomics or through a slot that the protocol
// gives to one side at a time.
unsafe impl Send for Mapping {}

impl Mapping {
    fn map(file: &std::fs::File) -> std::io::Result<Self> {
        // SAFETY: a fresh shared mapping of a file we hold open, of the size
        // checked by the caller; nothing else aliases it in this process.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAP_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { base: base.cast() })
    }

    fn u64_at(&self, at: usize) -> &AtomicU64 {
        // SAFETY: `at` is an 8-aligned offset inside the control page, which
        // lives as long as `self`.
        unsafe { AtomicU64::from_ptr(self.base.add(at).cast()) }
    }

    fn u32_at(&self, at: usize) -> &AtomicU32 {
        // SAFETY: as for `u64_at`.
        unsafe { AtomicU32::from_ptr(self.base.add(at).cast()) }
    }

    fn token(&self) -> [u8; TOKEN_LEN] {
        let mut t = [0u8; TOKEN_LEN];
        // SAFETY: the control page is in bounds; the token is written once
        // by the dialer before it offers the file.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(AT_TOKEN), t.as_mut_ptr(), TOKEN_LEN)
        };
        t
    }

    /// Slot `seq % SLOTS`: its used-bytes word and its data.
    ///
    /// SAFETY (callers): the protocol gives the slot to this side alone
    /// (the sender between acquiring and publishing it, the receiver between
    /// seeing it published and releasing it).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot(&self, seq: u64) -> (&AtomicU32, &mut [u8]) {
        let at = CONTROL_BYTES + (seq % SLOTS) as usize * SLOT_BYTES;
        let used = AtomicU32::from_ptr(self.base.add(at).cast());
        let data = std::slice::from_raw_parts_mut(
            self.base.add(at + SLOT_HEADER),
            SLOT_BYTES - SLOT_HEADER,
        );
        (used, data)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped; no borrow outlives self.
        unsafe { libc::munmap(self.base.cast(), MAP_BYTES) };
    }
}

/// The network namespace of this process (0 when unknown: then no link
/// goes through shared memory).
fn netns() -> u64 {
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0)
}

const OFFER_MAGIC: u32 = 0x5254_4f31; // "RTO1"
const PATH_MAX: usize = 64;
/// magic, flag, netns, token, path length, path.
const OFFER_LEN: usize = 4 + 1 + 8 + TOKEN_LEN + 1 + PATH_MAX;

/// The sender's side of a link being set up: the file it offers.
pub struct Offer {
    file: Option<(std::path::PathBuf, Mapping)>,
    token: [u8; TOKEN_LEN],
}

impl Offer {
    /// Creates the file to offer, or offers nothing when `enabled` is false
    /// or shared memory is not available here.
    pub fn create(enabled: bool) -> Self {
        let token: [u8; TOKEN_LEN] = rand::random();
        let file = if enabled && netns() != 0 {
            match Self::create_file(&token) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::debug!(error = %e, "no shared-memory ring link: cannot create its file");
                    None
                }
            }
        } else {
            None
        };
        Self { file, token }
    }

    fn create_file(token: &[u8; TOKEN_LEN]) -> std::io::Result<(std::path::PathBuf, Mapping)> {
        let name: [u8; 16] = rand::random();
        let hex: String = name.iter().map(|b| format!("{b:02x}")).collect();
        let path = std::path::PathBuf::from(format!("/dev/shm/ringtrain-{hex}"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let mapped = file
            .set_len(MAP_BYTES as u64)
            .and_then(|()| Mapping::map(&file));
        let map = match mapped {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        // SAFETY: fresh mapping, not offered yet: nobody else reads it.
        unsafe {
            std::ptr::copy_nonoverlapping(token.as_ptr(), map.base.add(AT_TOKEN), TOKEN_LEN);
        }
        map.u64_at(AT_MAGIC).store(MAGIC, Ordering::Release);
        Ok((path, map))
    }

    pub fn to_bytes(&self) -> [u8; OFFER_LEN] {
        let mut b = [0u8; OFFER_LEN];
        b[0..4].copy_from_slice(&OFFER_MAGIC.to_le_bytes());
        if let Some((path, _)) = &self.file {
            let p = path.as_os_str().as_encoded_bytes();
            b[4] = 1;
            b[5..13].copy_from_slice(&netns().to_le_bytes());
            b[13..13 + TOKEN_LEN].copy_from_slice(&self.token);
            b[13 + TOKEN_LEN] = p.len() as u8;
            b[14 + TOKEN_LEN..14 + TOKEN_LEN + p.len()].copy_from_slice(p);
        }
        b
    }

    /// The peer's answer: the mapping to send through, if it took the file.
    /// The file is unlinked either way (a taken one stays mapped).
    pub fn settle(mut self, taken: bool) -> Option<Mapping> {
        let (path, map) = self.file.take()?;
        let _ = std::fs::remove_file(&path);
        taken.then_some(map)
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        if let Some((path, _)) = &self.file {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The acceptor's side: takes the offered file if it can, else `None`
/// (and the link stays on TCP).
pub fn take_offer(offer: &[u8; OFFER_LEN], enabled: bool) -> Option<Mapping> {
    let why_not = |why: &str| {
        tracing::debug!(reason = why, "ring link stays on TCP");
        None
    };
    if u32::from_le_bytes([offer[0], offer[1], offer[2], offer[3]]) != OFFER_MAGIC {
        return why_not("not an offer");
    }
    if offer[4] != 1 || !enabled {
        return None;
    }
    let mut ns = [0u8; 8];
    ns.copy_from_slice(&offer[5..13]);
    if u64::from_le_bytes(ns) != netns() || netns() == 0 {
        return why_not("the neighbour is in another network namespace");
    }
    let len = offer[13 + TOKEN_LEN] as usize;
    if len > PATH_MAX {
        return why_not("offered path too long");
    }
    let path = &offer[14 + TOKEN_LEN..14 + TOKEN_LEN + len];
    let Ok(path) = std::str::from_utf8(path) else {
        return why_not("offered path is not UTF-8");
    };
    // Only our own kind of file, by name: never a path a peer picks freely.
    let Some(name) = path.strip_prefix("/dev/shm/ringtrain-") else {
        return why_not("offered path is not a ring file");
    };
    if name.len() != 32 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return why_not("offered path is not a ring file");
    }
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(_) => return why_not("offered file not reachable (another host or container)"),
    };
    let Ok(meta) = file.metadata() else {
        return why_not("cannot stat the offered file");
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.is_file() || meta.uid() != me || meta.len() != MAP_BYTES as u64 {
        return why_not("offered file is not ours or not a ring file");
    }
    let Ok(map) = Mapping::map(&file) else {
        return why_not("cannot map the offered file");
    };
    let mut token = [0u8; TOKEN_LEN];
    token.copy_from_slice(&offer[13..13 + TOKEN_LEN]);
    if map.u64_at(AT_MAGIC).load(Ordering::Acquire) != MAGIC || map.token() != token {
        return why_not("offered file does not hold the offered token");
    }
    Some(map)
}

pub const ANSWER_TAKEN: u8 = 0xA1;
pub const ANSWER_DECLINED: u8 = 0xA0;
pub const OFFER_BYTES: usize = OFFER_LEN;

/// Reads exactly one doorbell byte.
fn read_bell(bell: &mut TcpStream) -> std::io::Result<()> {
    let mut b = [0u8; 1];
    loop {
        match bell.read(&mut b) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Waits until `ready()`, sleeping on the doorbell under flag `waiting`.
fn wait(
    ready: impl Fn() -> bool,
    waiting: &AtomicU32,
    bell: &mut TcpStream,
) -> std::io::Result<()> {
    for _ in 0..YIELDS {
        if ready() {
            return Ok(());
        }
        std::thread::yield_now();
    }
    loop {
        waiting.store(1, Ordering::SeqCst);
        if ready() {
            if waiting.swap(0, Ordering::SeqCst) == 0 {
                // The other side took the flag: its byte is on the way.
                read_bell(bell)?;
            }
            return Ok(());
        }
        // Only a side that took the flag writes a byte, so this byte is ours.
        read_bell(bell)?;
    }
}

/// After publishing: wakes the other side if it sleeps.
fn ring_bell(waiting: &AtomicU32, bell: &mut TcpStream) -> std::io::Result<()> {
    if waiting.swap(0, Ordering::SeqCst) == 1 {
        bell.write_all(&[1])?;
    }
    Ok(())
}

pub struct ShmSender {
    map: Mapping,
    bell: TcpStream,
    cipher: LinkCipher,
    peer: Peer,
    timeout: Duration,
    /// Sequence number of the next slot to fill.
    next: u64,
}

impl ShmSender {
    pub fn new(
        map: Mapping,
        bell: TcpStream,
        cipher: LinkCipher,
        peer: Peer,
        timeout: Duration,
    ) -> Self {
        Self {
            map,
            bell,
            cipher,
            peer,
            timeout,
            next: 0,
        }
    }

    fn send_frame(&mut self, head: &[u8; FrameHeader::LEN], payload: &[u8]) -> std::io::Result<()> {
        let tag_len = self.cipher.tag_len();
        let pieces = self.cipher.pieces(payload.len());
        for batch in (0..pieces).step_by(BATCH_PIECES) {
            let end = (batch + BATCH_PIECES).min(pieces);
            let next = self.next;
            let read = self.map.u64_at(AT_READ);
            wait(
                || next - read.load(Ordering::Acquire).min(next) < SLOTS,
                self.map.u32_at(AT_SPACE_WAITING),
                &mut self.bell,
            )?;
            // SAFETY: the receiver released this slot (read > next - SLOTS)
            // and will not touch it until we publish it.
            let (used, slot) = unsafe { self.map.slot(next) };
            let mut at = 0;
            if batch == 0 {
                slot[..FrameHeader::LEN].copy_from_slice(head);
                at = FrameHeader::LEN;
            }
            for i in batch..end {
                let data = &payload[piece_range(payload.len(), i)];
                let (body, rest) = slot[at..].split_at_mut(data.len());
                body.copy_from_slice(data);
                if self.cipher.encrypts() {
                    self.cipher
                        .seal_in_place(head, i as u32, body, &mut rest[..tag_len]);
                } else {
                    self.cipher.tag(head, i as u32, body, &mut rest[..tag_len]);
                }
                at += data.len() + tag_len;
            }
            used.store(at as u32, Ordering::Relaxed);
            self.next += 1;
            self.map
                .u64_at(AT_WRITTEN)
                .store(self.next, Ordering::SeqCst);
            ring_bell(self.map.u32_at(AT_DATA_WAITING), &mut self.bell)?;
        }
        Ok(())
    }
}

impl FrameSender for ShmSender {
    fn plane(&self) -> &'static str {
        "shared-memory"
    }

    fn send(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<(), RingError> {
        let head = header.to_bytes();
        let sent = self.send_frame(&head, payload);
        self.cipher.next_frame();
        sent.map_err(|e| RingError::io(&self.peer, sending(header), self.timeout, e))
    }
}

pub struct ShmReceiver {
    map: Mapping,
    bell: TcpStream,
    cipher: LinkCipher,
    peer: Peer,
    timeout: Duration,
    /// Sequence number of the next slot to read.
    next: u64,
}

impl ShmReceiver {
    pub fn new(
        map: Mapping,
        bell: TcpStream,
        cipher: LinkCipher,
        peer: Peer,
        timeout: Duration,
    ) -> Self {
        Self {
            map,
            bell,
            cipher,
            peer,
            timeout,
            next: 0,
        }
    }

    fn refused(&self, source: ringtrain_common::wire::WireError) -> RingError {
        RingError::Refused {
            peer: self.peer.clone(),
            source,
        }
    }

    /// Opens each piece of the next frame in its slot and hands it to `sink`;
    /// nothing unchecked reaches it.
    fn recv_frame(
        &mut self,
        expected: &FrameHeader,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), RingError> {
        let total = expected.payload_bytes();
        let tag_len = self.cipher.tag_len();
        let pieces = self.cipher.pieces(total);
        let mut head = [0u8; FrameHeader::LEN];
        for batch in (0..pieces).step_by(BATCH_PIECES) {
            let end = (batch + BATCH_PIECES).min(pieces);
            let next = self.next;
            let written = self.map.u64_at(AT_WRITTEN);
            wait(
                || written.load(Ordering::Acquire) > next,
                self.map.u32_at(AT_DATA_WAITING),
                &mut self.bell,
            )
            .map_err(|e| RingError::io(&self.peer, receiving(expected), self.timeout, e))?;
            // SAFETY: the sender published this slot (written > next) and
            // will not touch it until we release it.
            let (used, slot) = unsafe { self.map.slot(next) };
            let header_bytes = if batch == 0 { FrameHeader::LEN } else { 0 };
            let want: usize = header_bytes
                + (batch..end)
                    .map(|i| piece_range(total, i).len() + tag_len)
                    .sum::<usize>();
            let got = used.load(Ordering::Relaxed) as usize;
            if got != want {
                return Err(self.refused(ringtrain_common::wire::WireError::Refused {
                    field: "shared-memory slot bytes",
                    got: got as u64,
                    expected: want as u64,
                    from_rank: expected.from_rank,
                }));
            }
            if batch == 0 {
                head.copy_from_slice(&slot[..FrameHeader::LEN]);
                let h = FrameHeader::from_bytes(&head).map_err(|e| self.refused(e))?;
                h.check(expected).map_err(|e| self.refused(e))?;
            }
            let mut at = header_bytes;
            for i in batch..end {
                let n = piece_range(total, i).len() + tag_len;
                let plain = self
                    .cipher
                    .open_in_place(&head, i as u32, &mut slot[at..at + n])
                    .map_err(|source| RingError::Refused {
                        peer: self.peer.clone(),
                        source,
                    })?;
                sink(plain);
                at += n;
            }
            self.next += 1;
            self.map.u64_at(AT_READ).store(self.next, Ordering::SeqCst);
            ring_bell(self.map.u32_at(AT_SPACE_WAITING), &mut self.bell)
                .map_err(|e| RingError::io(&self.peer, receiving(expected), self.timeout, e))?;
        }
        Ok(())
    }
}

impl FrameReceiver for ShmReceiver {
    fn recv_pieces(
        &mut self,
        expected: &FrameHeader,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), RingError> {
        let r = self.recv_frame(expected, sink);
        self.cipher.next_frame();
        r
    }

    fn recv(&mut self, expected: &FrameHeader, payload: &mut [u8]) -> Result<(), RingError> {
        let mut at = 0;
        let r = self.recv_frame(expected, &mut |piece| {
            payload[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        });
        self.cipher.next_frame();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::inbox::LinkKey;
    use crate::ring::secure::{Hello, RingKey, RingSecurity, Transcript};
    use ringtrain_common::wire::{Phase, WireEncoding};
    use ringtrain_common::{JobId, Rank, RingGeneration};

    fn link(security: RingSecurity) -> (ShmSender, ShmReceiver) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (b, _) = listener.accept().expect("accept");
        let key = RingKey::random();
        let hello = Hello::new(
            LinkKey {
                job: JobId(1),
                generation: RingGeneration(2),
                from_rank: Rank(0),
            },
            Rank(1),
            security,
        );
        let session = || Transcript::new(&hello, &[7u8; 32]).session_key(&key);
        let offer = Offer::create(true);
        let inbound = take_offer(&offer.to_bytes(), true).expect("taken");
        let outbound = offer.settle(true).expect("mapped");
        let peer = |r| Peer {
            rank: Rank(r),
            addr: "here".into(),
        };
        let t = Duration::from_secs(5);
        (
            ShmSender::new(
                outbound,
                a,
                LinkCipher::new(security, &session()),
                peer(1),
                t,
            ),
            ShmReceiver::new(
                inbound,
                b,
                LinkCipher::new(security, &session()),
                peer(0),
                t,
            ),
        )
    }

    fn header(elements: u32) -> FrameHeader {
        FrameHeader {
            job: JobId(1),
            generation: RingGeneration(2),
            step: 3,
            phase: Phase::AllGather,
            ring_step: 1,
            chunk: 0,
            offset: 0,
            elements,
            encoding: WireEncoding::F32,
            from_rank: Rank(0),
        }
    }

    #[test]
    fn frames_cross_in_order_and_a_tampered_slot_is_refused() {
        for security in [RingSecurity::Aead, RingSecurity::Mac] {
            let (mut tx, mut rx) = link(security);
            // Bigger than the ring: the sender waits for the receiver.
            let n = (SLOTS as usize + 3) * BATCH_PIECES * PIECE_BYTES / 4 + 11;
            let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let h = header(n as u32);
            let sending = std::thread::spawn(move || {
                tx.send(&h, bytemuck::cast_slice(&values)).expect("send");
                tx.send(&header(4), bytemuck::cast_slice(&[1f32, 2., 3., 4.]))
                    .expect("send");
                tx
            });
            let mut got = vec![0f32; n];
            rx.recv(&h, bytemuck::cast_slice_mut(&mut got))
                .expect("recv");
            assert!(
                got.iter().enumerate().all(|(i, &v)| v == i as f32),
                "{security}"
            );
            let _tx = sending.join().expect("sender");
            // The small frame is published: flip one byte of it in place.
            // SAFETY: the sender is done with the slot and waits for nothing.
            let (_, slot) = unsafe { rx.map.slot(rx.next) };
            slot[FrameHeader::LEN + 2] ^= 0x40;
            let mut small = [0f32; 4];
            let err = rx
                .recv(&header(4), bytemuck::cast_slice_mut(&mut small))
                .expect_err("tampered")
                .to_string();
            assert!(err.contains("failed authentication"), "{security}: {err}");
        }
    }

    #[test]
    fn a_closed_neighbour_ends_a_wait_at_once() {
        let (tx, mut rx) = link(RingSecurity::Aead);
        drop(tx);
        let started = std::time::Instant::now();
        let mut out = [0f32; 4];
        let err = rx
            .recv(&header(4), bytemuck::cast_slice_mut(&mut out))
            .expect_err("closed")
            .to_string();
        assert!(err.contains("closed the connection"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn an_offer_is_taken_only_for_a_real_ring_file_of_ours() {
        let offer = Offer::create(true);
        let bytes = offer.to_bytes();
        assert!(
            take_offer(&bytes, true).is_some(),
            "same process, same namespace"
        );
        assert!(take_offer(&bytes, false).is_none(), "disabled here");
        // Another token: refused.
        let mut forged = bytes;
        forged[13] ^= 1;
        assert!(take_offer(&forged, true).is_none());
        // Another namespace: refused.
        let mut other_ns = bytes;
        other_ns[5] ^= 1;
        assert!(take_offer(&other_ns, true).is_none());
        // A path outside the ring files: refused without opening it.
        let mut elsewhere = bytes;
        let p = b"/etc/passwd";
        elsewhere[13 + TOKEN_LEN] = p.len() as u8;
        elsewhere[14 + TOKEN_LEN..14 + TOKEN_LEN + p.len()].copy_from_slice(p);
        assert!(take_offer(&elsewhere, true).is_none());
        // Nothing offered: nothing taken; garbage: nothing taken.
        assert!(take_offer(&Offer::create(false).to_bytes(), true).is_none());
        assert!(take_offer(&[0u8; OFFER_LEN], true).is_none());
        // The file is gone once settled.
        let path = offer.file.as_ref().map(|(p, _)| p.clone()).expect("a file");
        assert!(offer.settle(true).is_some());
        assert!(!path.exists(), "the offered file is unlinked once settled");
    }
}
