//! The HPACK Huffman code (RFC 7541 §5.2, Appendix B), decoded four bits at a time.
//!
//! The code tree has 257 leaves (256 octets and EOS) and so 256 inner nodes. The decoder's
//! state is the inner node it stands on (the root between symbols); [`STEPS`] says, for each
//! state and each 4-bit nibble, which state follows, whether a symbol was completed on the
//! way (at most one: no code is shorter than 5 bits) and whether the nibble ran into EOS.
//! The table is computed at compile time, so decoding a string sets nothing up: two lookups
//! per input byte.

use super::HpackError;

/// `(code, length in bits)` for symbols 0 to 255 and EOS (256), from RFC 7541 Appendix B.
const CODES: [(u32, u8); 257] = [
    (0x1ff8, 13),
    (0x7fffd8, 23),
    (0xfffffe2, 28),
    (0xfffffe3, 28),
    (0xfffffe4, 28),
    (0xfffffe5, 28),
    (0xfffffe6, 28),
    (0xfffffe7, 28),
    (0xfffffe8, 28),
    (0xffffea, 24),
    (0x3ffffffc, 30),
    (0xfffffe9, 28),
    (0xfffffea, 28),
    (0x3ffffffd, 30),
    (0xfffffeb, 28),
    (0xfffffec, 28),
    (0xfffffed, 28),
    (0xfffffee, 28),
    (0xfffffef, 28),
    (0xffffff0, 28),
    (0xffffff1, 28),
    (0xffffff2, 28),
    (0x3ffffffe, 30),
    (0xffffff3, 28),
    (0xffffff4, 28),
    (0xffffff5, 28),
    (0xffffff6, 28),
    (0xffffff7, 28),
    (0xffffff8, 28),
    (0xffffff9, 28),
    (0xffffffa, 28),
    (0xffffffb, 28),
    (0x14, 6),
    (0x3f8, 10),
    (0x3f9, 10),
    (0xffa, 12),
    (0x1ff9, 13),
    (0x15, 6),
    (0xf8, 8),
    (0x7fa, 11),
    (0x3fa, 10),
    (0x3fb, 10),
    (0xf9, 8),
    (0x7fb, 11),
    (0xfa, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6),
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1a, 6),
    (0x1b, 6),
    (0x1c, 6),
    (0x1d, 6),
    (0x1e, 6),
    (0x1f, 6),
    (0x5c, 7),
    (0xfb, 8),
    (0x7ffc, 15),
    (0x20, 6),
    (0xffb, 12),
    (0x3fc, 10),
    (0x1ffa, 13),
    (0x21, 6),
    (0x5d, 7),
    (0x5e, 7),
    (0x5f, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7),
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7),
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6a, 7),
    (0x6b, 7),
    (0x6c, 7),
    (0x6d, 7),
    (0x6e, 7),
    (0x6f, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7),
    (0xfc, 8),
    (0x73, 7),
    (0xfd, 8),
    (0x1ffb, 13),
    (0x7fff0, 19),
    (0x1ffc, 13),
    (0x3ffc, 14),
    (0x22, 6),
    (0x7ffd, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5),
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6),
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7),
    (0x28, 6),
    (0x29, 6),
    (0x2a, 6),
    (0x7, 5),
    (0x2b, 6),
    (0x76, 7),
    (0x2c, 6),
    (0x8, 5),
    (0x9, 5),
    (0x2d, 6),
    (0x77, 7),
    (0x78, 7),
    (0x79, 7),
    (0x7a, 7),
    (0x7b, 7),
    (0x7ffe, 15),
    (0x7fc, 11),
    (0x3ffd, 14),
    (0x1ffd, 13),
    (0xffffffc, 28),
    (0xfffe6, 20),
    (0x3fffd2, 22),
    (0xfffe7, 20),
    (0xfffe8, 20),
    (0x3fffd3, 22),
    (0x3fffd4, 22),
    (0x3fffd5, 22),
    (0x7fffd9, 23),
    (0x3fffd6, 22),
    (0x7fffda, 23),
    (0x7fffdb, 23),
    (0x7fffdc, 23),
    (0x7fffdd, 23),
    (0x7fffde, 23),
    (0xffffeb, 24),
    (0x7fffdf, 23),
    (0xffffec, 24),
    (0xffffed, 24),
    (0x3fffd7, 22),
    (0x7fffe0, 23),
    (0xffffee, 24),
    (0x7fffe1, 23),
    (0x7fffe2, 23),
    (0x7fffe3, 23),
    (0x7fffe4, 23),
    (0x1fffdc, 21),
    (0x3fffd8, 22),
    (0x7fffe5, 23),
    (0x3fffd9, 22),
    (0x7fffe6, 23),
    (0x7fffe7, 23),
    (0xffffef, 24),
    (0x3fffda, 22),
    (0x1fffdd, 21),
    (0xfffe9, 20),
    (0x3fffdb, 22),
    (0x3fffdc, 22),
    (0x7fffe8, 23),
    (0x7fffe9, 23),
    (0x1fffde, 21),
    (0x7fffea, 23),
    (0x3fffdd, 22),
    (0x3fffde, 22),
    (0xfffff0, 24),
    (0x1fffdf, 21),
    (0x3fffdf, 22),
    (0x7fffeb, 23),
    (0x7fffec, 23),
    (0x1fffe0, 21),
    (0x1fffe1, 21),
    (0x3fffe0, 22),
    (0x1fffe2, 21),
    (0x7fffed, 23),
    (0x3fffe1, 22),
    (0x7fffee, 23),
    (0x7fffef, 23),
    (0xfffea, 20),
    (0x3fffe2, 22),
    (0x3fffe3, 22),
    (0x3fffe4, 22),
    (0x7ffff0, 23),
    (0x3fffe5, 22),
    (0x3fffe6, 22),
    (0x7ffff1, 23),
    (0x3ffffe0, 26),
    (0x3ffffe1, 26),
    (0xfffeb, 20),
    (0x7fff1, 19),
    (0x3fffe7, 22),
    (0x7ffff2, 23),
    (0x3fffe8, 22),
    (0x1ffffec, 25),
    (0x3ffffe2, 26),
    (0x3ffffe3, 26),
    (0x3ffffe4, 26),
    (0x7ffffde, 27),
    (0x7ffffdf, 27),
    (0x3ffffe5, 26),
    (0xfffff1, 24),
    (0x1ffffed, 25),
    (0x7fff2, 19),
    (0x1fffe3, 21),
    (0x3ffffe6, 26),
    (0x7ffffe0, 27),
    (0x7ffffe1, 27),
    (0x3ffffe7, 26),
    (0x7ffffe2, 27),
    (0xfffff2, 24),
    (0x1fffe4, 21),
    (0x1fffe5, 21),
    (0x3ffffe8, 26),
    (0x3ffffe9, 26),
    (0xffffffd, 28),
    (0x7ffffe3, 27),
    (0x7ffffe4, 27),
    (0x7ffffe5, 27),
    (0xfffec, 20),
    (0xfffff3, 24),
    (0xfffed, 20),
    (0x1fffe6, 21),
    (0x3fffe9, 22),
    (0x1fffe7, 21),
    (0x1fffe8, 21),
    (0x7ffff3, 23),
    (0x3fffea, 22),
    (0x3fffeb, 22),
    (0x1ffffee, 25),
    (0x1ffffef, 25),
    (0xfffff4, 24),
    (0xfffff5, 24),
    (0x3ffffea, 26),
    (0x7ffff4, 23),
    (0x3ffffeb, 26),
    (0x7ffffe6, 27),
    (0x3ffffec, 26),
    (0x3ffffed, 26),
    (0x7ffffe7, 27),
    (0x7ffffe8, 27),
    (0x7ffffe9, 27),
    (0x7ffffea, 27),
    (0x7ffffeb, 27),
    (0xffffffe, 28),
    (0x7ffffec, 27),
    (0x7ffffed, 27),
    (0x7ffffee, 27),
    (0x7ffffef, 27),
    (0x7fffff0, 27),
    (0x3ffffee, 26),
    (0x3fffffff, 30),
];

/// The EOS symbol's index in [`CODES`].
const EOS: usize = 256;

/// Inner nodes of the code tree: a full binary tree with 257 leaves has 256.
const NODES: usize = 256;

/// A child in the code tree under construction: 0 for none yet, an inner node's index
/// (never 0: the root is no one's child), or `LEAF | symbol`.
const LEAF: u16 = 0x8000;

/// [`Step::flags`]: the nibble completed a symbol, [`Step::symbol`].
const EMIT: u8 = 1;
/// [`Step::flags`]: the nibble completed EOS, which must not appear in a string.
const FAIL: u8 = 2;

/// What four more bits do from one state.
#[derive(Clone, Copy)]
struct Step {
    /// The state after the nibble.
    next: u8,
    /// The completed symbol when `flags` has [`EMIT`].
    symbol: u8,
    flags: u8,
}

/// What the decoder knows about each state.
#[derive(Clone, Copy)]
struct State {
    /// Bits read since the last symbol ended.
    depth: u8,
    /// Those bits are all ones (a prefix of EOS, so valid padding when at most 7).
    all_ones: bool,
}

struct Tables {
    steps: [[Step; 16]; NODES],
    states: [State; NODES],
}

/// Built at compile time; an inconsistent code table fails the build.
static TABLES: Tables = build();

const fn build() -> Tables {
    let mut children = [[0u16; 2]; NODES];
    let mut states = [State {
        depth: 0,
        all_ones: true,
    }; NODES];
    let mut inner = 1; // the root is node 0
    let mut symbol = 0;
    while symbol < CODES.len() {
        let (code, len) = CODES[symbol];
        let mut node = 0;
        let mut bit_index = len;
        while bit_index > 1 {
            bit_index -= 1;
            let bit = ((code >> bit_index) & 1) as usize;
            let child = children[node][bit];
            if child == 0 {
                assert!(inner < NODES, "more inner nodes than a full tree has");
                children[node][bit] = inner as u16;
                states[inner] = State {
                    depth: states[node].depth + 1,
                    all_ones: states[node].all_ones && bit == 1,
                };
                node = inner;
                inner += 1;
            } else {
                assert!(child & LEAF == 0, "a code is the prefix of another");
                node = child as usize;
            }
        }
        let bit = (code & 1) as usize;
        assert!(children[node][bit] == 0, "two codes are equal");
        children[node][bit] = LEAF | symbol as u16;
        symbol += 1;
    }
    assert!(inner == NODES, "the code is not complete");

    let mut steps = [[Step {
        next: 0,
        symbol: 0,
        flags: 0,
    }; 16]; NODES];
    let mut node = 0;
    while node < NODES {
        let mut nibble = 0;
        while nibble < 16 {
            let mut state = node;
            let mut step = Step {
                next: 0,
                symbol: 0,
                flags: 0,
            };
            let mut bit_index = 4;
            while bit_index > 0 && step.flags & FAIL == 0 {
                bit_index -= 1;
                let child = children[state][(nibble >> bit_index) & 1];
                // Every child is set: the tree is full (checked above).
                if child & LEAF == 0 {
                    state = child as usize;
                } else if (child & !LEAF) as usize == EOS {
                    step.flags |= FAIL;
                } else {
                    step.flags |= EMIT;
                    step.symbol = (child & !LEAF) as u8;
                    state = 0;
                }
            }
            step.next = state as u8;
            steps[node][nibble] = step;
            nibble += 1;
        }
        node += 1;
    }
    Tables { steps, states }
}

/// Decodes a Huffman-coded string literal into `out` (cleared first).
///
/// Rejects what RFC 7541 §5.2 says a decoder must: EOS inside the string, padding longer than
/// 7 bits, and padding that is not the most significant bits of EOS (all ones).
pub(super) fn decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    out.clear();
    // Every symbol takes at least 5 bits.
    out.reserve(input.len() * 8 / 5);
    let mut state = 0u8;
    for &byte in input {
        for nibble in [byte >> 4, byte & 0x0f] {
            let step = TABLES.steps[usize::from(state)][usize::from(nibble)];
            if step.flags & FAIL != 0 {
                return Err(HpackError::HuffmanEos);
            }
            if step.flags & EMIT != 0 {
                out.push(step.symbol);
            }
            state = step.next;
        }
    }
    let end = TABLES.states[usize::from(state)];
    if end.depth > 7 {
        Err(HpackError::HuffmanPaddingTooLong)
    } else if !end.all_ones {
        Err(HpackError::HuffmanBadPadding)
    } else {
        Ok(())
    }
}

/// Huffman-codes `input` and pads with ones: the encoder the tests need.
#[cfg(test)]
pub(crate) fn encode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut bits, mut pending) = (0u64, 0u32);
    for &byte in input {
        let (code, len) = CODES[usize::from(byte)];
        bits = (bits << len) | u64::from(code);
        pending += u32::from(len);
        while pending >= 8 {
            pending -= 8;
            out.push((bits >> pending) as u8);
        }
    }
    if pending > 0 {
        let pad = 8 - pending;
        out.push(((bits << pad) | ((1 << pad) - 1)) as u8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(input: &[u8]) -> Result<Vec<u8>, HpackError> {
        let mut out = vec![1, 2, 3];
        decode(input, &mut out).map(|()| out)
    }

    #[test]
    fn rfc7541_examples_decode() {
        // C.4.1 and C.4.2.
        let www = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        assert_eq!(decoded(&www).unwrap(), b"www.example.com");
        assert_eq!(
            decoded(&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]).unwrap(),
            b"no-cache"
        );
        assert_eq!(decoded(&[]).unwrap(), b"");
        assert_eq!(encode(b"www.example.com"), www);
    }

    #[test]
    fn every_octet_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decoded(&encode(&all)).unwrap(), all);
        for b in 0..=255u8 {
            for len in [1, 2, 3, 7] {
                let s = vec![b; len];
                assert_eq!(decoded(&encode(&s)).unwrap(), s, "{b:#x} x {len}");
            }
        }
    }

    #[test]
    fn bad_padding_and_eos_are_refused() {
        // `a` is 00011: three bits of padding, all ones.
        assert_eq!(decoded(&[0x1f]).unwrap(), b"a");
        assert_eq!(decoded(&[0x1e]), Err(HpackError::HuffmanBadPadding));
        // A whole byte of ones after a complete symbol: 8 bits of padding.
        assert_eq!(
            decoded(&[0x1f, 0xff]),
            Err(HpackError::HuffmanPaddingTooLong)
        );
        assert_eq!(decoded(&[0xff]), Err(HpackError::HuffmanPaddingTooLong));
        // `0` is 00000: a zero padding bit after it.
        assert_eq!(decoded(&[0x00]), Err(HpackError::HuffmanBadPadding));
        // EOS (30 ones) spelt out.
        assert_eq!(
            decoded(&[0xff, 0xff, 0xff, 0xfc]),
            Err(HpackError::HuffmanEos)
        );
        assert_eq!(decoded(&[0xff; 8]), Err(HpackError::HuffmanEos));
        // 24 ones are not EOS yet, but too much padding.
        assert_eq!(
            decoded(&[0xff, 0xff, 0xff]),
            Err(HpackError::HuffmanPaddingTooLong)
        );
        // 29 ones and a zero are symbol 22 (a 30-bit code); two zero bits of padding follow.
        assert_eq!(
            decoded(&[0xff, 0xff, 0xff, 0xf8]),
            Err(HpackError::HuffmanBadPadding)
        );
        assert_eq!(decoded(&[0xff, 0xff, 0xff, 0xfb]).unwrap(), [22]);
    }

    #[test]
    fn the_tree_is_canonical_and_complete() {
        // Kraft's sum is exactly 1, and depth/all-ones bookkeeping matches the codes.
        let sum: u64 = CODES.iter().map(|&(_, len)| 1u64 << (30 - len)).sum();
        assert_eq!(sum, 1 << 30);
        assert_eq!(TABLES.states[0].depth, 0);
        let deepest = TABLES.states.iter().map(|s| s.depth).max().unwrap();
        assert_eq!(deepest, 29);
        let ones = TABLES.states.iter().filter(|s| s.all_ones).count();
        assert_eq!(
            ones, 30,
            "the root and the 29 inner nodes on the way to EOS"
        );
    }
}
