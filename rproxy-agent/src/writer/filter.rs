//! The writer's side of the service filter (`rproxy_common::svc_filter`, map `RPX_SVC_FILTER`):
//! how many programmed frontends share each bit, the words that follows from that, and the
//! words the map holds.
//!
//! A new frontend's bit is written before the frontend is published ([`Filter::preset`]); a bit
//! is cleared only once no programmed frontend has it, after the removal ([`Filter::flush`]). So
//! the filter never hides a published frontend from the datapath; a set bit with no frontend
//! only costs the packets that hit it two lookups.
use std::collections::{BTreeSet, HashMap};

use rproxy_common::svc_filter;

use super::{Op, key_of};
use crate::model::Frontend;

const WORDS: usize = svc_filter::WORDS as usize;

#[derive(Debug)]
pub(super) struct Filter {
    /// Programmed frontends per bit (bits with none are absent).
    refs: HashMap<u32, u32>,
    /// The words `refs` calls for.
    wanted: Vec<u64>,
    /// The words the map holds (as far as this writer wrote or read them).
    written: Vec<u64>,
    /// Words where `wanted` and `written` may differ.
    dirty: BTreeSet<u32>,
}

impl Default for Filter {
    fn default() -> Self {
        Self { refs: HashMap::new(), wanted: vec![0; WORDS], written: vec![0; WORDS], dirty: BTreeSet::new() }
    }
}

fn bit_of(fe: Frontend) -> u32 {
    let k = key_of(fe, 0);
    svc_filter::bit(k.addr, k.port, k.proto)
}

fn index(bit: u32) -> (u32, u64) {
    (bit >> 6, 1u64 << (bit & 63))
}

fn usize_of(word: u32) -> usize {
    usize::try_from(word).expect("word index < WORDS")
}

impl Filter {
    /// A filter whose map holds `words` (read at start; anything but `WORDS` words counts as
    /// unknown, all zero, and is rewritten in full).
    pub(super) fn adopt(words: Vec<u64>) -> Self {
        let mut f = Self::default();
        if words.len() == WORDS {
            f.written = words;
        } else {
            f.dirty = (0..svc_filter::WORDS).collect();
        }
        f
    }

    /// Marks every word where the map differs from what the programmed frontends call for (after
    /// adopting, when a previous agent's bits may be stale).
    pub(super) fn mark_all(&mut self) {
        self.dirty.extend((0..svc_filter::WORDS).filter(|&i| self.wanted[usize_of(i)] != self.written[usize_of(i)]));
    }

    /// `fe` is programmed.
    pub(super) fn add(&mut self, fe: Frontend) {
        let bit = bit_of(fe);
        let n = self.refs.entry(bit).or_default();
        *n += 1;
        if *n == 1 {
            let (word, mask) = index(bit);
            self.wanted[usize_of(word)] |= mask;
            self.dirty.insert(word);
        }
    }

    /// `fe` is no longer programmed.
    pub(super) fn remove(&mut self, fe: Frontend) {
        let bit = bit_of(fe);
        let Some(n) = self.refs.get_mut(&bit) else { return };
        *n -= 1;
        if *n == 0 {
            self.refs.remove(&bit);
            let (word, mask) = index(bit);
            self.wanted[usize_of(word)] &= !mask;
            self.dirty.insert(word);
        }
    }

    /// Makes sure the map has `fe`'s bit before `fe` is published.
    pub(super) fn preset(
        &mut self,
        fe: Frontend,
        run: &mut impl FnMut(Op) -> Result<(), String>,
    ) -> Result<(), String> {
        let (word, mask) = index(bit_of(fe));
        let held = self.written[usize_of(word)];
        if held & mask != 0 {
            return Ok(());
        }
        run(Op::PutFilterWord(word, held | mask)).map_err(|e| format!("service filter: {e}"))?;
        self.written[usize_of(word)] = held | mask;
        // Until `fe` is recorded as programmed (or not), the word may hold more than wanted.
        self.dirty.insert(word);
        Ok(())
    }

    /// Writes the words that differ from what the programmed frontends call for. Failures are
    /// returned and retried by the next flush.
    pub(super) fn flush(&mut self, run: &mut impl FnMut(Op) -> Result<(), String>) -> Vec<String> {
        let mut errors = Vec::new();
        for word in std::mem::take(&mut self.dirty) {
            let (i, wanted) = (usize_of(word), self.wanted[usize_of(word)]);
            if self.written[i] == wanted {
                continue;
            }
            match run(Op::PutFilterWord(word, wanted)) {
                Ok(()) => self.written[i] = wanted,
                Err(e) => {
                    errors.push(format!("service filter word {word}: {e}"));
                    self.dirty.insert(word);
                }
            }
        }
        errors
    }

    /// Whether the map holds `fe`'s bit (tests).
    #[cfg(test)]
    pub(super) fn written_has(&self, fe: Frontend) -> bool {
        let (word, mask) = index(bit_of(fe));
        self.written[usize_of(word)] & mask != 0
    }
}
