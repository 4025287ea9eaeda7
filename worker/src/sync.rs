//! The start-of-generation sync: before a new ring generation trains, its
//! members agree on the state to start from. Each member contributes what it
//! holds ([`Holding`]); the members exchange the table through one exact
//! all-reduce (each fills only its own row; zeros elsewhere make the sum an
//! exact gather); then every member computes the same [`Plan`] from it.
//!
//! Integers travel as f32 pieces of 24 bits: every integer below 2^24 is
//! exact in f32, so versions and shard positions arrive exact whatever their
//! size (three pieces carry any u64), and a cursor past 2^24 samples is never
//! rounded (which would skip samples or use some twice).

use ringtrain_common::data_plan::ShardCursor;
use ringtrain_common::ParamVersion;

/// What one member holds when a generation starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holding {
    /// False until the member has been through a sync: its parameters are
    /// only its own seeded init (or nothing loaded yet).
    pub trained: bool,
    pub version: ParamVersion,
    pub cursor: ShardCursor,
    /// Whether it holds optimizer state (momentum) to hand on.
    pub has_optimizer_state: bool,
}

const PIECE_BITS: u32 = 24;
const PIECE_MASK: u64 = (1 << PIECE_BITS) - 1;
/// 3 × 24 bits: any u64.
pub(crate) const PIECES: usize = 3;
/// Slots per member: two flags, then version, epoch and position in pieces.
pub const SLOTS: usize = 2 + 3 * PIECES;

/// What every member does next, the same on every member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Every member holds the newest version: nothing to send.
    InSync { version: ParamVersion },
    /// Members behind take parameters (and optimizer state, if the source
    /// has some) from `source`, the lowest rank holding the newest version.
    Broadcast { source: usize, from: Holding },
    /// Nobody has trained: all start from the same checkpoint or seeded
    /// init, made identical by a broadcast from rank 0.
    Fresh,
}

/// A table that did not come from members running this code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sync table: {0}")]
pub struct SyncError(String);

impl SyncError {
    pub(crate) fn new(what: String) -> Self {
        Self(what)
    }
}

/// Writes `value` as [`PIECES`] exact f32 pieces of 24 bits.
pub(crate) fn encode_u64(slots: &mut [f32], value: u64) {
    for (i, slot) in slots.iter_mut().enumerate() {
        *slot = ((value >> (PIECE_BITS * i as u32)) & PIECE_MASK) as f32;
    }
}

/// Reads what [`encode_u64`] wrote.
pub(crate) fn decode_u64(slots: &[f32]) -> Result<u64, SyncError> {
    let mut value = 0u64;
    for (i, &slot) in slots.iter().enumerate() {
        if !(slot >= 0.0 && slot <= PIECE_MASK as f32 && slot.fract() == 0.0) {
            return Err(SyncError(format!("{slot} is not a 24-bit piece")));
        }
        let piece = u64::from(slot as u32);
        let shift = PIECE_BITS * i as u32;
        // The top piece carries the last 16 bits of a u64.
        if piece.checked_shl(shift).and_then(|v| v.checked_shr(shift)) != Some(piece) {
            return Err(SyncError("a value does not fit in 64 bits".into()));
        }
        value |= piece << shift;
    }
    Ok(value)
}

fn flag(slot: f32) -> Result<bool, SyncError> {
    match slot {
        0.0 => Ok(false),
        1.0 => Ok(true),
        other => Err(SyncError(format!("{other} is not a flag"))),
    }
}

/// The table a member sends: zeros but for its own row.
pub fn encode(mine: &Holding, rank: usize, world: usize) -> Vec<f32> {
    let mut table = vec![0f32; SLOTS * world];
    let row = &mut table[rank * SLOTS..(rank + 1) * SLOTS];
    row[0] = f32::from(u8::from(mine.trained));
    row[1] = f32::from(u8::from(mine.has_optimizer_state));
    encode_u64(&mut row[2..2 + PIECES], mine.version.0);
    encode_u64(&mut row[2 + PIECES..2 + 2 * PIECES], mine.cursor.epoch);
    encode_u64(&mut row[2 + 2 * PIECES..], mine.cursor.position);
    table
}

/// Every member's holding, from the summed table.
pub fn decode(table: &[f32], world: usize) -> Result<Vec<Holding>, SyncError> {
    if world == 0 || Some(table.len()) != SLOTS.checked_mul(world) {
        return Err(SyncError(format!(
            "{} values for {world} members of {SLOTS}",
            table.len()
        )));
    }
    table
        .chunks_exact(SLOTS)
        .map(|row| {
            Ok(Holding {
                trained: flag(row[0])?,
                has_optimizer_state: flag(row[1])?,
                version: ParamVersion(decode_u64(&row[2..2 + PIECES])?),
                cursor: ShardCursor {
                    epoch: decode_u64(&row[2 + PIECES..2 + 2 * PIECES])?,
                    position: decode_u64(&row[2 + 2 * PIECES..])?,
                },
            })
        })
        .collect()
}

/// What the members do, given what each holds (by rank).
pub fn plan(members: &[Holding]) -> Plan {
    let trained = members.iter().enumerate().filter(|(_, h)| h.trained);
    let Some(newest) = trained.clone().map(|(_, h)| h.version).max() else {
        return Plan::Fresh;
    };
    let Some((source, from)) = trained.clone().find(|(_, h)| h.version == newest) else {
        return Plan::Fresh;
    };
    if members.iter().all(|h| h.trained && h.version == newest) {
        Plan::InSync { version: newest }
    } else {
        Plan::Broadcast {
            source,
            from: *from,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(trained: bool, version: u64, position: u64) -> Holding {
        Holding {
            trained,
            version: ParamVersion(version),
            cursor: ShardCursor { epoch: 2, position },
            has_optimizer_state: trained,
        }
    }

    /// What the all-reduce computes: the element-wise sum of every member's table.
    fn exchange(members: &[Holding]) -> Vec<Holding> {
        let world = members.len();
        let mut sum = vec![0f32; SLOTS * world];
        for (rank, h) in members.iter().enumerate() {
            for (s, v) in sum.iter_mut().zip(encode(h, rank, world)) {
                *s += v;
            }
        }
        decode(&sum, world).unwrap()
    }

    #[test]
    fn positions_and_versions_arrive_exact_far_past_f32_precision() {
        let big = Holding {
            trained: true,
            version: ParamVersion((1 << 40) + 3),
            cursor: ShardCursor {
                epoch: (1 << 33) + 1,
                position: (1 << 40) + 1,
            },
            has_optimizer_state: false,
        };
        let max = Holding {
            version: ParamVersion(u64::MAX),
            cursor: ShardCursor {
                epoch: 1 << 53,
                position: (1 << 53) - 1,
            },
            ..big
        };
        let members = [big, holding(false, 0, 0), max];
        assert_eq!(exchange(&members), members);
        // As one f32 each, 2^40 + 1 would have arrived as 2^40.
        assert_eq!(((1u64 << 40) + 1) as f32 as u64, 1 << 40);
    }

    #[test]
    fn members_holding_the_newest_version_need_nothing() {
        let members = [holding(true, 7, 64), holding(true, 7, 64)];
        assert_eq!(
            plan(&members),
            Plan::InSync {
                version: ParamVersion(7)
            }
        );
    }

    #[test]
    fn the_lowest_rank_with_the_newest_version_is_the_source() {
        let members = [
            holding(true, 5, 10),
            holding(true, 9, 90),
            holding(false, 0, 0),
            holding(true, 9, 90),
        ];
        assert_eq!(
            plan(&members),
            Plan::Broadcast {
                source: 1,
                from: members[1]
            }
        );
        // A fresh joiner with a higher (untrained) version counts for nothing.
        let members = [holding(false, 50, 0), holding(true, 3, 30)];
        assert_eq!(
            plan(&members),
            Plan::Broadcast {
                source: 1,
                from: members[1]
            }
        );
    }

    #[test]
    fn nobody_trained_means_a_fresh_start() {
        assert_eq!(plan(&[holding(false, 0, 0); 3]), Plan::Fresh);
    }

    #[test]
    fn a_corrupt_table_is_refused() {
        let mut t = encode(&holding(true, 1, 1), 0, 1);
        t[3] = 0.5;
        assert!(decode(&t, 1).unwrap_err().to_string().contains("0.5"));
        t[3] = 0.0;
        t[0] = 2.0;
        assert!(decode(&t, 1).is_err(), "two members claimed rank 0");
        assert!(decode(&[0.0; 5], 1).is_err());
        assert!(decode(&[], 0).is_err(), "a ring has members");
        assert!(decode(&[0.0; SLOTS], usize::MAX).is_err());
    }

    mod props {
        use proptest::prelude::*;

        use super::super::*;

        prop_compose! {
            fn any_holding()(
                trained in any::<bool>(),
                has_optimizer_state in any::<bool>(),
                version in any::<u64>(),
                epoch in any::<u64>(),
                position in any::<u64>(),
            ) -> Holding {
                Holding {
                    trained,
                    version: ParamVersion(version),
                    cursor: ShardCursor { epoch, position },
                    has_optimizer_state,
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_holdings_arrive_exact(members in prop::collection::vec(any_holding(), 1..9)) {
                prop_assert_eq!(super::exchange(&members), members);
            }

            #[test]
            fn any_table_decodes_or_is_refused_without_panic(
                bits in prop::collection::vec(any::<u32>(), 0..(3 * SLOTS)),
                world in prop_oneof![0usize..4, any::<usize>()],
            ) {
                let table: Vec<f32> = bits.into_iter().map(f32::from_bits).collect();
                if let Ok(members) = decode(&table, world) {
                    prop_assert_eq!(members.len(), world);
                    // What decodes re-encodes to the same table (no -0.0 or
                    // NaN slipped through as a value).
                    let mut again = vec![0f32; table.len()];
                    for (rank, h) in members.iter().enumerate() {
                        for (s, v) in again.iter_mut().zip(encode(h, rank, world)) {
                            *s += v;
                        }
                    }
                    let same = again.iter().zip(&table).all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0));
                    prop_assert!(same);
                }
            }

            #[test]
            fn the_plan_starts_from_the_newest_trained_version(members in prop::collection::vec(any_holding(), 1..9)) {
                let newest = members.iter().filter(|h| h.trained).map(|h| h.version).max();
                match plan(&members) {
                    Plan::Fresh => prop_assert_eq!(newest, None),
                    Plan::InSync { version } => {
                        prop_assert!(members.iter().all(|h| h.trained && h.version == version));
                    }
                    Plan::Broadcast { source, from } => {
                        prop_assert_eq!(Some(from.version), newest);
                        prop_assert_eq!(members[source], from);
                        prop_assert!(members[..source].iter().all(|h| !(h.trained && Some(h.version) == newest)));
                    }
                }
            }
        }
    }
}
