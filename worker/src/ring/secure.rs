//! Who may send us ring frames, and how frames are protected on the wire.
//!
//! **Handshake.** The coordinator hands every member of a (job, generation)
//! the same random [`RingKey`]. The dialer (left neighbour) opens with a
//! [`Hello`] naming job, generation, both ranks, the security mode and its
//! nonce; the acceptor answers with its own nonce and a proof (keyed BLAKE3
//! over the whole transcript); the dialer checks it and answers with its own
//! proof. Each side has then shown it knows the key for exactly this link, in
//! this generation, in this direction, freshly (both nonces). The link's
//! session key is derived from the same transcript, so every link direction
//! of every generation has its own key.
//!
//! **Frames.** A frame's payload travels in pieces of [`PIECE_BYTES`], each
//! followed by its tag ([`LinkCipher::tag_len`]). The tag covers the frame's
//! header, the frame's sequence number on this link and the piece's index,
//! so a flipped bit, a replayed or reordered frame, or a piece moved within a
//! frame all fail. The receiver checks each piece before it sums it.
//! - `aead`: AES-128-GCM (ring, hardware AES): integrity and confidentiality.
//!   AES-128 rather than 256: 1.7x the throughput here (VAES), and each key
//!   lives for one link of one generation.
//! - `mac`: keyed BLAKE3: integrity only, gradients readable on the wire.
//! - `none`: no tags (the handshake still runs): for measurement and trusted
//!   networks only.

use std::fmt;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use ringtrain_common::wire::{FrameHeader, WireError};
use ringtrain_common::{JobId, Rank, RingGeneration};

pub use ringtrain_common::ring_key::RingKey;

use super::inbox::LinkKey;

/// Bytes of payload per authenticated piece: small enough that the receiver
/// sums a checked piece while it is still in cache.
pub const PIECE_BYTES: usize = 64 * 1024;
/// The bytes of piece `i` of a payload of `total` bytes.
pub fn piece_range(total: usize, i: usize) -> std::ops::Range<usize> {
    (i * PIECE_BYTES).min(total)..((i + 1) * PIECE_BYTES).min(total)
}

/// The largest tag of any mode.
pub const MAX_TAG_LEN: usize = 32;
pub const NONCE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;

/// How ring frames are protected. Both ends of a link must agree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RingSecurity {
    /// AES-128-GCM per piece: the fastest secure option measured (see README).
    #[default]
    Aead,
    /// Keyed BLAKE3 per piece: tamper-evident, not confidential.
    Mac,
    /// Authenticated handshake only; frames travel as they are.
    None,
}

impl RingSecurity {
    fn as_u32(self) -> u32 {
        match self {
            Self::Aead => 1,
            Self::Mac => 2,
            Self::None => 3,
        }
    }

    fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Aead),
            2 => Some(Self::Mac),
            3 => Some(Self::None),
            _ => None,
        }
    }
}

impl fmt::Display for RingSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Aead => "aead",
            Self::Mac => "mac",
            Self::None => "none",
        })
    }
}

impl std::str::FromStr for RingSecurity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "aead" => Ok(Self::Aead),
            "mac" => Ok(Self::Mac),
            "none" => Ok(Self::None),
            other => Err(format!(
                "unknown ring security '{}' (expected aead, mac or none)",
                ringtrain_common::quote(other)
            )),
        }
    }
}

const HELLO_MAGIC: u32 = 0x5254_4832; // "RTH2"

/// The dialer's opening message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub job: JobId,
    pub generation: RingGeneration,
    pub from_rank: Rank,
    pub to_rank: Rank,
    pub security: RingSecurity,
    pub nonce: [u8; NONCE_LEN],
}

impl Hello {
    pub const LEN: usize = 64;

    pub fn new(key: LinkKey, to_rank: Rank, security: RingSecurity) -> Self {
        Self {
            job: key.job,
            generation: key.generation,
            from_rank: key.from_rank,
            to_rank,
            security,
            nonce: rand::random(),
        }
    }

    pub fn link_key(&self) -> LinkKey {
        LinkKey {
            job: self.job,
            generation: self.generation,
            from_rank: self.from_rank,
        }
    }

    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        b[4..12].copy_from_slice(&self.job.0.to_le_bytes());
        b[12..20].copy_from_slice(&self.generation.0.to_le_bytes());
        b[20..24].copy_from_slice(&self.from_rank.0.to_le_bytes());
        b[24..28].copy_from_slice(&self.to_rank.0.to_le_bytes());
        b[28..32].copy_from_slice(&self.security.as_u32().to_le_bytes());
        b[32..64].copy_from_slice(&self.nonce);
        b
    }

    /// Parses a peer's hello; anything else is refused with the reason.
    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        let b: &[u8; Self::LEN] = b
            .try_into()
            .map_err(|_| format!("hello of {} bytes, expected {}", b.len(), Self::LEN))?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        if u32_at(0) != HELLO_MAGIC {
            return Err("not a ringtrain ring hello".into());
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[32..64]);
        Ok(Self {
            job: JobId(u64_at(4)),
            generation: RingGeneration(u64_at(12)),
            from_rank: Rank(u32_at(20)),
            to_rank: Rank(u32_at(24)),
            security: RingSecurity::from_u32(u32_at(28))
                .ok_or_else(|| format!("unknown ring security {}", u32_at(28)))?,
            nonce,
        })
    }
}

/// Everything both sides said before the proofs: what the proofs and the
/// session key are bound to.
pub struct Transcript([u8; Hello::LEN + NONCE_LEN]);

impl Transcript {
    pub fn new(hello: &Hello, acceptor_nonce: &[u8; NONCE_LEN]) -> Self {
        let mut t = [0u8; Hello::LEN + NONCE_LEN];
        t[..Hello::LEN].copy_from_slice(&hello.to_bytes());
        t[Hello::LEN..].copy_from_slice(acceptor_nonce);
        Self(t)
    }

    fn keyed(&self, key: &RingKey, label: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(key.as_bytes());
        h.update(label);
        h.update(&self.0);
        h.finalize()
    }

    /// Distinct labels per role, so neither proof can be reflected back as
    /// the other.
    pub fn acceptor_proof(&self, key: &RingKey) -> [u8; PROOF_LEN] {
        *self
            .keyed(key, b"ringtrain ring v2 acceptor proof")
            .as_bytes()
    }

    pub fn dialer_proof(&self, key: &RingKey) -> [u8; PROOF_LEN] {
        *self
            .keyed(key, b"ringtrain ring v2 dialer proof")
            .as_bytes()
    }

    /// The key of the dialer-to-acceptor direction, the only one frames take.
    pub fn session_key(&self, key: &RingKey) -> SessionKey {
        SessionKey(*self.keyed(key, b"ringtrain ring v2 session").as_bytes())
    }
}

/// Compares a proof in constant time (blake3's `Hash` equality is).
pub fn proof_matches(expected: &[u8; PROOF_LEN], got: &[u8]) -> bool {
    match <[u8; PROOF_LEN]>::try_from(got) {
        Ok(got) => blake3::Hash::from_bytes(*expected) == blake3::Hash::from_bytes(got),
        Err(_) => false,
    }
}

pub struct SessionKey([u8; 32]);

enum Cipher {
    /// Boxed: the expanded AES key is large next to the other modes.
    Aead(Box<LessSafeKey>),
    Mac([u8; 32]),
    None,
}

/// One direction of one link: seals (sender) or opens (receiver) frames in
/// order. Both ends count frames, which is what makes a replayed or
/// reordered frame fail.
pub struct LinkCipher {
    cipher: Cipher,
    frame: u64,
}

impl LinkCipher {
    pub fn new(security: RingSecurity, session: &SessionKey) -> Self {
        let cipher = match security {
            RingSecurity::Aead => Cipher::Aead(Box::new(LessSafeKey::new(
                UnboundKey::new(&AES_128_GCM, &session.0[..16])
                    .unwrap_or_else(|_| unreachable!("AES-128 takes any 16-byte key")),
            ))),
            RingSecurity::Mac => Cipher::Mac(session.0),
            RingSecurity::None => Cipher::None,
        };
        Self { cipher, frame: 0 }
    }

    /// Frames as they are, unsealed (mode none without a session key).
    pub fn plain() -> Self {
        Self {
            cipher: Cipher::None,
            frame: 0,
        }
    }

    /// Bytes of tag after each piece (0 in mode none).
    pub fn tag_len(&self) -> usize {
        match self.cipher {
            Cipher::Aead(_) => AES_128_GCM.tag_len(),
            Cipher::Mac(_) => 32,
            Cipher::None => 0,
        }
    }

    /// Whether sealing rewrites the payload (so the sender needs a copy).
    pub fn encrypts(&self) -> bool {
        matches!(self.cipher, Cipher::Aead(_))
    }

    pub fn protects(&self) -> bool {
        !matches!(self.cipher, Cipher::None)
    }

    /// Pieces of a payload of `payload` bytes; an empty payload still has one
    /// (tagged) piece, so even an empty frame is authenticated.
    pub fn pieces(&self, payload: usize) -> usize {
        payload.div_ceil(PIECE_BYTES).max(1)
    }

    /// Bytes on the wire after the header for a payload of `payload` bytes.
    pub fn sealed_len(&self, payload: usize) -> usize {
        if self.protects() {
            payload + self.pieces(payload) * self.tag_len()
        } else {
            payload
        }
    }

    fn nonce(&self, piece: u32) -> Nonce {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&self.frame.to_le_bytes());
        n[8..].copy_from_slice(&piece.to_le_bytes());
        Nonce::assume_unique_for_key(n)
    }

    fn mac(
        &self,
        key: &[u8; 32],
        header: &[u8; FrameHeader::LEN],
        piece: u32,
        data: &[u8],
    ) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(&self.frame.to_le_bytes());
        h.update(&piece.to_le_bytes());
        h.update(header);
        h.update(data);
        h.finalize()
    }

    /// Seals piece `piece` of the current frame: AEAD encrypts `data` in
    /// place; every mode writes the tag into `tag` (`tag_len` bytes).
    pub fn seal_in_place(
        &self,
        header: &[u8; FrameHeader::LEN],
        piece: u32,
        data: &mut [u8],
        tag: &mut [u8],
    ) {
        match &self.cipher {
            Cipher::Aead(key) => {
                let t = key
                    .seal_in_place_separate_tag(self.nonce(piece), Aad::from(&header[..]), data)
                    .unwrap_or_else(|_| unreachable!("pieces are far below AES-GCM's limit"));
                tag.copy_from_slice(t.as_ref());
            }
            Cipher::Mac(_) => self.tag(header, piece, data, tag),
            Cipher::None => {}
        }
    }

    /// The MAC of a piece left as it is (modes mac and none).
    pub fn tag(&self, header: &[u8; FrameHeader::LEN], piece: u32, data: &[u8], tag: &mut [u8]) {
        match &self.cipher {
            Cipher::Mac(key) => tag.copy_from_slice(self.mac(key, header, piece, data).as_bytes()),
            Cipher::None => {}
            Cipher::Aead(_) => unreachable!("AEAD pieces are sealed in place"),
        }
    }

    /// Checks (and for AEAD decrypts) a received piece: `sealed` is the piece
    /// followed by its tag. Returns the plaintext, or an error without having
    /// exposed anything unchecked.
    pub fn open_in_place<'a>(
        &self,
        header: &[u8; FrameHeader::LEN],
        piece: u32,
        sealed: &'a mut [u8],
    ) -> Result<&'a mut [u8], WireError> {
        let bad = || WireError::Unauthentic {
            frame: self.frame,
            piece,
        };
        let tag_len = self.tag_len();
        if sealed.len() < tag_len {
            return Err(bad());
        }
        match &self.cipher {
            Cipher::Aead(key) => key
                .open_in_place(self.nonce(piece), Aad::from(&header[..]), sealed)
                .map_err(|_| bad()),
            Cipher::Mac(key) => {
                let (data, tag) = sealed.split_at_mut(sealed.len() - tag_len);
                let want = self.mac(key, header, piece, data);
                if proof_matches(want.as_bytes(), tag) {
                    Ok(data)
                } else {
                    Err(bad())
                }
            }
            Cipher::None => Ok(sealed),
        }
    }

    /// Checks (and for AEAD decrypts) a piece whose tag arrived apart from
    /// it: `data` is decrypted in place. On an error `data` holds unchecked
    /// bytes, which the caller must discard.
    pub fn open_detached(
        &self,
        header: &[u8; FrameHeader::LEN],
        piece: u32,
        data: &mut [u8],
        tag: &[u8],
    ) -> Result<(), WireError> {
        let bad = || WireError::Unauthentic {
            frame: self.frame,
            piece,
        };
        match &self.cipher {
            Cipher::Aead(key) => {
                let tag = ring::aead::Tag::try_from(tag).map_err(|_| bad())?;
                key.open_in_place_separate_tag(
                    self.nonce(piece),
                    Aad::from(&header[..]),
                    tag,
                    data,
                    0..,
                )
                .map(|_| ())
                .map_err(|_| bad())
            }
            Cipher::Mac(key) => {
                let want = self.mac(key, header, piece, data);
                if proof_matches(want.as_bytes(), tag) {
                    Ok(())
                } else {
                    Err(bad())
                }
            }
            Cipher::None => Ok(()),
        }
    }

    /// Moves on to the next frame of the link.
    pub fn next_frame(&mut self) {
        self.frame += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringtrain_common::wire::{Phase, WireEncoding};

    fn header(step: u64) -> [u8; FrameHeader::LEN] {
        FrameHeader {
            job: JobId(1),
            generation: RingGeneration(2),
            step,
            phase: Phase::ReduceScatter,
            ring_step: 0,
            chunk: 0,
            offset: 0,
            elements: 4,
            encoding: WireEncoding::F32,
            from_rank: Rank(0),
        }
        .to_bytes()
    }

    fn pair(security: RingSecurity) -> (LinkCipher, LinkCipher) {
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
        let t = Transcript::new(&hello, &rand::random());
        (
            LinkCipher::new(security, &t.session_key(&key)),
            LinkCipher::new(security, &t.session_key(&key)),
        )
    }

    fn seal(tx: &LinkCipher, h: &[u8; 64], data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        let mut tag = vec![0u8; tx.tag_len()];
        if tx.encrypts() {
            tx.seal_in_place(h, 0, &mut out, &mut tag);
        } else {
            tx.tag(h, 0, data, &mut tag);
        }
        out.extend_from_slice(&tag);
        out
    }

    #[test]
    fn sealed_pieces_open_and_any_flipped_bit_or_replay_fails() {
        for security in [RingSecurity::Aead, RingSecurity::Mac] {
            let (mut tx, mut rx) = pair(security);
            let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
            let h = header(1);
            let first = seal(&tx, &h, &data);
            if security == RingSecurity::Aead {
                assert_ne!(&first[..data.len()], &data[..], "aead hides the payload");
            }
            let mut ok = first.clone();
            assert_eq!(rx.open_in_place(&h, 0, &mut ok).expect("opens"), &data[..]);
            for bit in [0, 7 * 8 + 3, data.len() * 8 + 5] {
                let mut bad = first.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                let err = rx.open_in_place(&h, 0, &mut bad).expect_err("tampered");
                assert!(err.to_string().contains("failed authentication"), "{err}");
            }
            // Another header, another piece index: refused.
            assert!(rx.open_in_place(&header(2), 0, &mut first.clone()).is_err());
            assert!(rx.open_in_place(&h, 1, &mut first.clone()).is_err());
            // Next frame: the first one replayed is refused.
            tx.next_frame();
            rx.next_frame();
            assert!(
                rx.open_in_place(&h, 0, &mut first.clone()).is_err(),
                "{security}: replay accepted"
            );
            let second = seal(&tx, &h, &data);
            assert_eq!(
                rx.open_in_place(&h, 0, &mut second.clone()).expect("opens"),
                &data[..]
            );
        }
    }

    #[test]
    fn a_piece_with_its_tag_apart_opens_and_any_flipped_bit_fails() {
        for security in [RingSecurity::Aead, RingSecurity::Mac] {
            let (tx, rx) = pair(security);
            let data: Vec<u8> = (0..777u32).map(|i| (i * 7) as u8).collect();
            let h = header(1);
            let sealed = seal(&tx, &h, &data);
            let (body, tag) = sealed.split_at(data.len());
            let mut got = body.to_vec();
            rx.open_detached(&h, 0, &mut got, tag).expect("opens");
            assert_eq!(got, data, "{security}");
            for bit in [3, data.len() * 8 - 1] {
                let mut bad = body.to_vec();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    rx.open_detached(&h, 0, &mut bad, tag).is_err(),
                    "{security}"
                );
            }
            let mut bad_tag = tag.to_vec();
            bad_tag[0] ^= 1;
            assert!(rx
                .open_detached(&h, 0, &mut body.to_vec(), &bad_tag)
                .is_err());
            assert!(rx.open_detached(&h, 1, &mut body.to_vec(), tag).is_err());
            assert!(rx
                .open_detached(&h, 0, &mut body.to_vec(), &tag[..3])
                .is_err());
        }
    }

    #[test]
    fn a_link_key_opens_nothing_of_another_link() {
        let (tx, _) = pair(RingSecurity::Aead);
        let (_, other_rx) = pair(RingSecurity::Aead);
        let h = header(1);
        let mut sealed = seal(&tx, &h, b"gradient");
        assert!(other_rx.open_in_place(&h, 0, &mut sealed).is_err());
    }

    #[test]
    fn proofs_depend_on_key_role_and_both_nonces() {
        let key = RingKey::random();
        let hello = Hello::new(
            LinkKey {
                job: JobId(1),
                generation: RingGeneration(2),
                from_rank: Rank(0),
            },
            Rank(1),
            RingSecurity::Aead,
        );
        assert_eq!(Hello::from_bytes(&hello.to_bytes()), Ok(hello));
        assert!(Hello::from_bytes(&[0u8; 64]).is_err());
        assert!(Hello::from_bytes(&[0u8; 3]).is_err());
        let nonce = rand::random();
        let t = Transcript::new(&hello, &nonce);
        let a = t.acceptor_proof(&key);
        assert!(proof_matches(
            &a,
            &Transcript::new(&hello, &nonce).acceptor_proof(&key)
        ));
        assert!(!proof_matches(&a, &t.dialer_proof(&key)));
        assert!(!proof_matches(&a, &t.acceptor_proof(&RingKey::random())));
        assert!(!proof_matches(
            &a,
            &Transcript::new(&hello, &rand::random()).acceptor_proof(&key)
        ));
        assert!(!proof_matches(&a, &a[..31]));
    }
}
