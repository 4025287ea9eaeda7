//! Pieces every ringtrain crate shares: id newtypes and the job lifecycle's
//! vocabulary, the job spec, the data plan (which samples each step uses),
//! the ring wire codec, training curves (and their TensorBoard event
//! files), metrics, tracing setup, and the process and connection helpers
//! the binary and the tests use.

pub mod curve;
pub mod data_plan;
pub mod grpc_status;
pub mod health;
pub mod ids;
pub mod job_state;
pub mod jobspec;
pub mod local_cluster;
pub mod metrics;
pub mod paths;
pub mod process;
pub mod retry;
pub mod ring_key;
pub mod security;
pub mod telemetry;
pub mod tensorboard;
pub mod testing;
pub mod wire;
pub mod worker_api;

pub use ids::{JobId, ParamVersion, Rank, RingGeneration, WorkerId};
pub use job_state::JobState;

/// Input quoted in an error message, cut to at most [`QUOTE_MAX`] characters:
/// a peer's 100 KB string must not come back to it (or fill a log) whole.
pub fn quote(input: &str) -> std::borrow::Cow<'_, str> {
    cut(input, QUOTE_MAX)
}

/// `input` cut to at most `max_chars` characters, saying how long it was.
pub fn cut(input: &str, max_chars: usize) -> std::borrow::Cow<'_, str> {
    match input.char_indices().nth(max_chars) {
        None => std::borrow::Cow::Borrowed(input),
        Some((cut, _)) => {
            std::borrow::Cow::Owned(format!("{}… ({} bytes)", &input[..cut], input.len()))
        }
    }
}

/// Characters of outside input that an error message quotes at most.
pub const QUOTE_MAX: usize = 100;

/// A message from a library that may embed outside input (a parser's
/// "unknown field `…`"): every word cut by [`quote`], the whole to at most
/// four quotes' worth.
pub fn quote_message(message: &str) -> String {
    let words: Vec<std::borrow::Cow<'_, str>> = message.split(' ').map(quote).collect();
    let joined = words.join(" ");
    match joined.char_indices().nth(4 * QUOTE_MAX) {
        None => joined,
        Some((cut, _)) => format!("{}…", &joined[..cut]),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_input_is_cut_when_quoted() {
        assert_eq!(super::quote("short"), "short");
        let long = "x".repeat(100_000);
        let q = super::quote(&long);
        assert!(q.len() < 130, "{}", q.len());
        assert!(q.ends_with("… (100000 bytes)"), "{q}");
        // Cut on a character boundary.
        let wide = "é".repeat(200);
        assert!(super::quote(&wide).starts_with(&"é".repeat(100)));
    }

    #[test]
    fn a_message_embedding_long_input_is_cut_word_by_word() {
        let key = "k".repeat(100_000);
        let m = super::quote_message(&format!("unknown field `{key}`, expected `name`"));
        assert!(m.len() < 200, "{}", m.len());
        assert!(
            m.starts_with("unknown field `kkk") && m.ends_with("expected `name`"),
            "{m}"
        );
        let many = "word ".repeat(50_000);
        assert!(super::quote_message(&many).chars().count() <= 4 * super::QUOTE_MAX + 1);
        assert_eq!(super::quote_message("short one"), "short one");
    }
}
