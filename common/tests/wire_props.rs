//! Property tests of the ring frame header decoder as it is: whatever 64
//! bytes a peer sends, decoding never panics, and a frame is accepted only
//! when it is exactly the one expected, so the payload a receiver reads is
//! the size it planned for, never what a peer claims.

use proptest::prelude::*;
use ringtrain_common::wire::{FrameHeader, Phase, WireEncoding};
use ringtrain_common::{JobId, Rank, RingGeneration};

fn phase() -> impl Strategy<Value = Phase> {
    prop_oneof![Just(Phase::ReduceScatter), Just(Phase::AllGather)]
}

fn encoding() -> impl Strategy<Value = WireEncoding> {
    prop_oneof![
        Just(WireEncoding::F32),
        Just(WireEncoding::F16),
        Just(WireEncoding::Bf16)
    ]
}

prop_compose! {
    fn header()(
        job in any::<u64>(),
        generation in any::<u64>(),
        step in any::<u64>(),
        phase in phase(),
        ring_step in any::<u32>(),
        chunk in any::<u32>(),
        offset in any::<u64>(),
        elements in any::<u32>(),
        encoding in encoding(),
        from_rank in any::<u32>(),
    ) -> FrameHeader {
        FrameHeader {
            job: JobId(job),
            generation: RingGeneration(generation),
            step,
            phase,
            ring_step,
            chunk,
            offset,
            elements,
            encoding,
            from_rank: Rank(from_rank),
        }
    }
}

/// A header that differs from `h` in one field (`which`), by `delta` != 0.
fn changed(h: &FrameHeader, which: usize, delta: u32) -> FrameHeader {
    let mut o = *h;
    match which {
        0 => o.job.0 = o.job.0.wrapping_add(delta.into()),
        1 => o.generation.0 = o.generation.0.wrapping_add(delta.into()),
        2 => o.step = o.step.wrapping_add(delta.into()),
        3 => {
            o.phase = match o.phase {
                Phase::ReduceScatter => Phase::AllGather,
                Phase::AllGather => Phase::ReduceScatter,
            }
        }
        4 => o.ring_step = o.ring_step.wrapping_add(delta),
        5 => o.chunk = o.chunk.wrapping_add(delta),
        6 => o.offset = o.offset.wrapping_add(delta.into()),
        7 => o.elements = o.elements.wrapping_add(delta),
        8 => {
            o.encoding = match o.encoding {
                WireEncoding::F32 => WireEncoding::F16,
                WireEncoding::F16 => WireEncoding::Bf16,
                WireEncoding::Bf16 => WireEncoding::F32,
            }
        }
        _ => o.from_rank.0 = o.from_rank.0.wrapping_add(delta),
    }
    o
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_64_bytes_decode_or_are_refused_without_panic(bytes in prop::array::uniform32(any::<u8>()), more in prop::array::uniform32(any::<u8>())) {
        let mut raw = [0u8; FrameHeader::LEN];
        raw[..32].copy_from_slice(&bytes);
        raw[32..].copy_from_slice(&more);
        // Half the cases with the right magic, so the fields get decoded too.
        if bytes[0] & 1 == 0 {
            raw[0..4].copy_from_slice(&0x5254_5231u32.to_le_bytes());
        }
        if let Ok(h) = FrameHeader::from_bytes(&raw) {
            // What decodes encodes back to the same bytes (the last four are unused).
            let mut again = raw;
            again[60..].fill(0);
            prop_assert_eq!(h.to_bytes(), again);
        }
    }

    #[test]
    fn headers_round_trip(h in header()) {
        prop_assert_eq!(FrameHeader::from_bytes(&h.to_bytes()), Ok(h));
    }

    #[test]
    fn only_the_expected_frame_is_accepted(h in header(), which in 0usize..10, delta in 1u32..) {
        // The only frame accepted is the expected one, so its payload is
        // what the receiver sized for.
        prop_assert_eq!(h.check(&h), Ok(()));
        prop_assert!(changed(&h, which, delta).check(&h).is_err());
    }

    #[test]
    fn half_payloads_of_any_bits_decode_as_quantize_says(words in prop::collection::vec(any::<u16>(), 0..256), f16 in any::<bool>()) {
        let enc = if f16 { WireEncoding::F16 } else { WireEncoding::Bf16 };
        let mut values = vec![0f32; words.len()];
        enc.decode_half(&words, &mut values);
        // Re-encoding what was decoded is lossless, NaN payloads aside.
        let mut back = vec![0u16; words.len()];
        enc.encode_half(&values, &mut back);
        let mut again = vec![0f32; words.len()];
        enc.decode_half(&back, &mut again);
        for (a, b) in values.iter().zip(&again) {
            prop_assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        }
    }

    #[test]
    fn quantize_is_what_the_wire_carries(values in prop::collection::vec(any::<u32>().prop_map(f32::from_bits), 0..256), f16 in any::<bool>()) {
        // The owner of a reduced chunk quantizes; the others decode: alike,
        // NaN and Inf included (so a non-finite check agrees on every rank).
        let enc = if f16 { WireEncoding::F16 } else { WireEncoding::Bf16 };
        let mut wire = vec![0u16; values.len()];
        enc.encode_half(&values, &mut wire);
        let mut decoded = vec![0f32; values.len()];
        enc.decode_half(&wire, &mut decoded);
        let mut quantized = values.clone();
        enc.quantize(&mut quantized);
        for (q, d) in quantized.iter().zip(&decoded) {
            prop_assert!(q.to_bits() == d.to_bits() || (q.is_nan() && d.is_nan()), "{} vs {}", q, d);
            prop_assert_eq!(q.is_finite(), d.is_finite());
        }
    }
}
