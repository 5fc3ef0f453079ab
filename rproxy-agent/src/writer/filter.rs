//! The writer's side of a filter bitmap (`rproxy_common::filter`: `RPX_SVC_FILTER` over the
//! frontends, `RPX_BE_FILTER` over the backends): how many programmed entries share each bit,
//! the words that follow from that, and the words the map holds.
//!
//! A new entry's bit is written before the entry is ([`Filter::preset`]); a bit is cleared only
//! once no programmed entry has it, after the removal ([`Filter::flush`]). So the filter never
//! hides an entry from the datapath; a set bit with no entry only costs the packets that hit
//! it a lookup or two.
use std::collections::BTreeSet;

use rproxy_common::filter;

use super::{Op, Run};

const WORDS: usize = filter::WORDS as usize;

/// Which filter map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterMap {
    Services,
    Backends,
}

#[derive(Debug)]
pub(super) struct Filter {
    map: FilterMap,
    /// Programmed entries per bit, indexed by bit: 1 MiB, where a hash map of the bits in use
    /// took 4.7 MiB for 300,000 backends.
    refs: Vec<u32>,
    /// The words `refs` calls for.
    wanted: Vec<u64>,
    /// The words the map holds (as far as this writer wrote or read them).
    written: Vec<u64>,
    /// Words where `wanted` and `written` may differ.
    dirty: BTreeSet<u32>,
}

fn index(bit: u32) -> (u32, u64) {
    (bit >> 6, 1u64 << (bit & 63))
}

fn bit_index(bit: u32) -> usize {
    usize::try_from(bit).expect("bit < WORDS * 64")
}

fn usize_of(word: u32) -> usize {
    usize::try_from(word).expect("word index < WORDS")
}

impl Filter {
    /// A filter for an empty map.
    pub(super) fn new(map: FilterMap) -> Self {
        Self { map, refs: vec![0; WORDS * 64], wanted: vec![0; WORDS], written: vec![0; WORDS], dirty: BTreeSet::new() }
    }

    /// A filter whose map holds `words` (read at start). Anything but `WORDS` words is taken as
    /// all zero: every bit the adopted entries need is then written again, and a stale set bit
    /// the map may hold costs only lookups.
    pub(super) fn adopt(map: FilterMap, words: Vec<u64>) -> Self {
        let mut f = Self::new(map);
        if words.len() == WORDS {
            f.written = words;
        }
        f
    }

    /// Marks every word where the map differs from what the programmed entries call for (after
    /// adopting, when a previous agent's bits may be stale).
    pub(super) fn mark_all(&mut self) {
        self.dirty.extend((0..filter::WORDS).filter(|&i| self.wanted[usize_of(i)] != self.written[usize_of(i)]));
    }

    /// An entry with `bit` is programmed.
    pub(super) fn add(&mut self, bit: u32) {
        let n = &mut self.refs[bit_index(bit)];
        *n += 1;
        if *n == 1 {
            let (word, mask) = index(bit);
            self.wanted[usize_of(word)] |= mask;
            self.dirty.insert(word);
        }
    }

    /// An entry with `bit` is no longer programmed.
    pub(super) fn remove(&mut self, bit: u32) {
        let n = &mut self.refs[bit_index(bit)];
        if *n == 0 {
            return;
        }
        *n -= 1;
        if *n == 0 {
            let (word, mask) = index(bit);
            self.wanted[usize_of(word)] &= !mask;
            self.dirty.insert(word);
        }
    }

    /// Makes sure the map has `bit` before the entry it stands for is written.
    pub(super) fn preset(&mut self, bit: u32, run: &mut impl Run) -> Result<(), String> {
        let (word, mask) = index(bit);
        let held = self.written[usize_of(word)];
        if held & mask != 0 {
            return Ok(());
        }
        run.op(Op::PutFilterWord(self.map, word, held | mask)).map_err(|e| format!("{:?} filter: {e}", self.map))?;
        self.written[usize_of(word)] = held | mask;
        // Until the entry is recorded as programmed (or not), the word may hold more than wanted.
        self.dirty.insert(word);
        Ok(())
    }

    /// [`Filter::preset`] for many bits, each word written once with all its new bits.
    /// Failures are ignored: the entries' own presets try again and report.
    pub(super) fn preset_all(&mut self, bits: impl Iterator<Item = u32>, run: &mut impl Run) {
        let mut words: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
        for (word, mask) in bits.map(index) {
            if self.written[usize_of(word)] & mask == 0 {
                *words.entry(word).or_default() |= mask;
            }
        }
        for (word, masks) in words {
            let held = self.written[usize_of(word)];
            if run.op(Op::PutFilterWord(self.map, word, held | masks)).is_ok() {
                self.written[usize_of(word)] = held | masks;
                self.dirty.insert(word);
            }
        }
    }

    /// Writes the words that differ from what the programmed frontends call for. Failures are
    /// returned and retried by the next flush.
    pub(super) fn flush(&mut self, run: &mut impl Run) -> Vec<String> {
        let mut errors = Vec::new();
        for word in std::mem::take(&mut self.dirty) {
            let (i, wanted) = (usize_of(word), self.wanted[usize_of(word)]);
            if self.written[i] == wanted {
                continue;
            }
            match run.op(Op::PutFilterWord(self.map, word, wanted)) {
                Ok(()) => self.written[i] = wanted,
                Err(e) => {
                    errors.push(format!("{:?} filter word {word}: {e}", self.map));
                    self.dirty.insert(word);
                }
            }
        }
        errors
    }

    /// Whether the map holds `bit`.
    pub(super) fn written_has(&self, bit: u32) -> bool {
        let (word, mask) = index(bit);
        self.written[usize_of(word)] & mask != 0
    }
}
