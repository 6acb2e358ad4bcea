//! An HPACK decoder (RFC 7541) for one connection's client-to-server header blocks.
//!
//! It follows the client's encoder: the 61-entry static table, a dynamic table with size-based
//! eviction (§4), dynamic table size updates (§6.3, only at the start of a block and up to a
//! limit), indexed fields (§6.1) and literals with incremental indexing, without indexing and
//! never indexed (§6.2), with raw or Huffman-coded strings (§5.2, [`huffman`]). Fields are
//! handed to a callback as slices into the block, the table or a scratch buffer, so decoding
//! allocates only for the entries it adds to the dynamic table.

use std::collections::VecDeque;
use std::ops::ControlFlow;

mod huffman;

#[cfg(test)]
pub(crate) use huffman::encode as huffman_encode;

/// The HPACK static table (RFC 7541 Appendix A); entry `i` has index `i + 1`.
pub(crate) const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// The dynamic table's size before any size update: HTTP/2's default
/// SETTINGS_HEADER_TABLE_SIZE, which h2 does not change.
const INITIAL_TABLE_SIZE: usize = 4096;

/// Continuation bytes an integer may have: four carry 28 bits, more than any index, length
/// or table size in a block we accept needs (RFC 7541 §5.1 lets a decoder refuse longer ones).
const MAX_INTEGER_CONTINUATIONS: usize = 4;

/// Why a header block is not valid HPACK, or goes past one of the decoder's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HpackError {
    /// An integer (an index, a string length or a table size) is cut off by the end of the
    /// block.
    #[error("integer cut off by the end of the block")]
    IntegerTruncated,
    /// An integer has more than four continuation bytes (RFC 7541 §5.1).
    #[error("integer longer than {} bytes", MAX_INTEGER_CONTINUATIONS + 1)]
    IntegerTooLong,
    /// A string literal is longer than what is left of the block.
    #[error("string literal of {len} bytes runs past the end of the block")]
    StringTruncated {
        /// The length the literal claims.
        len: usize,
    },
    /// A Huffman-coded string ends with more than 7 bits of padding (RFC 7541 §5.2).
    #[error("huffman-coded string padded with more than 7 bits")]
    HuffmanPaddingTooLong,
    /// A Huffman-coded string ends with padding that is not all ones, the most significant bits
    /// of EOS (RFC 7541 §5.2).
    #[error("huffman-coded string padded with bits that are not all ones")]
    HuffmanBadPadding,
    /// A Huffman-coded string contains the EOS symbol (RFC 7541 §5.2).
    #[error("huffman-coded string contains the eos symbol")]
    HuffmanEos,
    /// An index is 0 or past the end of the dynamic table (RFC 7541 §2.3.3).
    #[error("index {index} is not in the static or dynamic table")]
    BadIndex {
        /// The index the block used.
        index: usize,
    },
    /// A dynamic table size update asks for more than the decoder allows.
    #[error("dynamic table size update to {size} bytes, above the limit of {limit}")]
    TableSizeTooLarge {
        /// The size asked for.
        size: usize,
        /// The decoder's limit.
        limit: usize,
    },
    /// A dynamic table size update comes after a header field (RFC 7541 §4.2: it belongs at
    /// the start of a block).
    #[error("dynamic table size update after a header field")]
    SizeUpdateNotAtStart,
    /// A block ends with a dynamic table size update: it holds no header field.
    #[error("header block ends with a dynamic table size update")]
    SizeUpdateAtEnd,
    /// A block holds more Huffman-coded strings than the decoder allows. The front reports it
    /// as [`FrontError::TooManyHuffmanStrings`](crate::FrontError::TooManyHuffmanStrings).
    #[error("more than {limit} huffman-coded strings in one header block")]
    TooManyHuffmanStrings {
        /// The decoder's limit.
        limit: usize,
    },
}

/// A dynamic table entry: name and value in one allocation.
#[derive(Debug)]
struct Entry {
    bytes: Box<[u8]>,
    name_len: usize,
}

impl Entry {
    fn new(name: &[u8], value: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(name.len() + value.len());
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(value);
        Self {
            bytes: bytes.into_boxed_slice(),
            name_len: name.len(),
        }
    }

    fn field(&self) -> (&[u8], &[u8]) {
        self.bytes.split_at(self.name_len)
    }

    /// RFC 7541 §4.1: name and value lengths plus 32.
    fn size(&self) -> usize {
        self.bytes.len() + 32
    }
}

/// The dynamic table (RFC 7541 §2.3.2, §4): newest entry first.
#[derive(Debug)]
struct DynamicTable {
    entries: VecDeque<Entry>,
    size: usize,
    max_size: usize,
}

impl DynamicTable {
    /// The field with HPACK index `index` (static entries first, then dynamic ones).
    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        let found = match index.checked_sub(1) {
            Some(i) if i < STATIC_TABLE.len() => STATIC_TABLE.get(i).copied(),
            Some(i) => self.entries.get(i - STATIC_TABLE.len()).map(Entry::field),
            None => None,
        };
        found.ok_or(HpackError::BadIndex { index })
    }

    /// Adds an entry, evicting the oldest ones to make room; an entry larger than the whole
    /// table empties it and is not added (RFC 7541 §4.4).
    fn insert(&mut self, entry: Entry) {
        let size = entry.size();
        self.evict_until(self.max_size.saturating_sub(size));
        if size <= self.max_size {
            self.size += size;
            self.entries.push_front(entry);
        }
    }

    fn set_max_size(&mut self, max_size: usize) {
        self.max_size = max_size;
        self.evict_until(max_size);
    }

    fn evict_until(&mut self, size: usize) {
        while self.size > size {
            match self.entries.pop_back() {
                Some(old) => self.size -= old.size(),
                None => {
                    // Unreachable: `size` is the sum over `entries`.
                    self.size = 0;
                }
            }
        }
    }
}

/// A string literal as decoded: where its bytes are.
enum Literal<'b> {
    /// Sent raw: a slice of the block.
    Raw(&'b [u8]),
    /// Huffman-coded: decoded into the scratch buffer passed along.
    Decoded,
}

/// Per-block bookkeeping for the Huffman-coded string limit.
struct HuffmanBudget {
    left: usize,
    limit: usize,
}

/// Follows one client encoder's state across the header blocks of a connection.
#[derive(Debug)]
pub(crate) struct Decoder {
    table: DynamicTable,
    /// What a dynamic table size update may ask for.
    max_table_size: usize,
    max_huffman_strings: usize,
    /// Where Huffman-coded names and values are decoded to.
    name_buf: Vec<u8>,
    value_buf: Vec<u8>,
}

impl Decoder {
    /// A decoder in the state every connection starts in (empty dynamic table of 4096 bytes)
    /// that refuses size updates above `max_table_size` and blocks with more than
    /// `max_huffman_strings` Huffman-coded strings.
    pub(crate) fn new(max_table_size: usize, max_huffman_strings: usize) -> Self {
        Self {
            table: DynamicTable {
                entries: VecDeque::new(),
                size: 0,
                max_size: INITIAL_TABLE_SIZE,
            },
            max_table_size,
            max_huffman_strings,
            name_buf: Vec::new(),
            value_buf: Vec::new(),
        }
    }

    /// Gives back scratch memory beyond `keep` bytes that a large Huffman-coded string took.
    pub(crate) fn shrink_buffers(&mut self, keep: usize) {
        for buf in [&mut self.name_buf, &mut self.value_buf] {
            if buf.capacity() > keep {
                buf.clear();
                buf.shrink_to(keep);
            }
        }
    }

    /// Decodes one complete header block, calling `on_field` with each field in order. When
    /// `on_field` breaks, decoding stops there (leaving the table half updated: the caller is
    /// giving up on the connection).
    ///
    /// After an error the decoder no longer follows the client's encoder.
    pub(crate) fn decode(
        &mut self,
        block: &[u8],
        mut on_field: impl FnMut(&[u8], &[u8]) -> ControlFlow<()>,
    ) -> Result<(), HpackError> {
        let mut rest = block;
        let mut budget = HuffmanBudget {
            left: self.max_huffman_strings,
            limit: self.max_huffman_strings,
        };
        let mut fields = false;
        let mut last_was_update = false;
        while let Some(&first) = rest.first() {
            last_was_update = false;
            let flow = if first & 0x80 != 0 {
                // §6.1 Indexed Header Field.
                let (index, after) = integer(rest, 7)?;
                rest = after;
                fields = true;
                let (name, value) = self.table.get(index)?;
                on_field(name, value)
            } else if first & 0xe0 == 0x20 {
                // §6.3 Dynamic Table Size Update.
                let (size, after) = integer(rest, 5)?;
                rest = after;
                if fields {
                    return Err(HpackError::SizeUpdateNotAtStart);
                }
                if size > self.max_table_size {
                    return Err(HpackError::TableSizeTooLarge {
                        size,
                        limit: self.max_table_size,
                    });
                }
                self.table.set_max_size(size);
                last_was_update = true;
                ControlFlow::Continue(())
            } else {
                // §6.2.1 with incremental indexing (01), §6.2.2 without (0000), §6.2.3 never
                // indexed (0001).
                let indexing = first & 0x40 != 0;
                let (index, after) = integer(rest, if indexing { 6 } else { 4 })?;
                rest = after;
                fields = true;
                let name = if index == 0 {
                    let (name, after) = string(rest, &mut self.name_buf, &mut budget)?;
                    rest = after;
                    match name {
                        Literal::Raw(raw) => raw,
                        Literal::Decoded => &self.name_buf,
                    }
                } else {
                    self.table.get(index)?.0
                };
                let (value, after) = string(rest, &mut self.value_buf, &mut budget)?;
                rest = after;
                let value = match value {
                    Literal::Raw(raw) => raw,
                    Literal::Decoded => &self.value_buf,
                };
                if indexing {
                    // Copied before the insertion, which may evict the entry `name` is from.
                    let entry = Entry::new(name, value);
                    let (name, value) = entry.field();
                    let flow = on_field(name, value);
                    self.table.insert(entry);
                    flow
                } else {
                    on_field(name, value)
                }
            };
            if flow.is_break() {
                return Ok(());
            }
        }
        if last_was_update {
            return Err(HpackError::SizeUpdateAtEnd);
        }
        Ok(())
    }
}

/// An RFC 7541 §5.1 integer with a `prefix_bits`-bit prefix at the start of `buf` (which is
/// not empty), and the bytes after it.
fn integer(buf: &[u8], prefix_bits: u8) -> Result<(usize, &[u8]), HpackError> {
    let (&first, mut rest) = buf.split_first().ok_or(HpackError::IntegerTruncated)?;
    let max_prefix = (1usize << prefix_bits) - 1;
    let mut value = usize::from(first) & max_prefix;
    if value < max_prefix {
        return Ok((value, rest));
    }
    for shift in (0..MAX_INTEGER_CONTINUATIONS).map(|i| 7 * i) {
        let (&b, after) = rest.split_first().ok_or(HpackError::IntegerTruncated)?;
        rest = after;
        value += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok((value, rest));
        }
    }
    Err(HpackError::IntegerTooLong)
}

/// An RFC 7541 §5.2 string literal at the start of `buf`, and the bytes after it. A
/// Huffman-coded one is decoded into `scratch`.
fn string<'b>(
    buf: &'b [u8],
    scratch: &mut Vec<u8>,
    budget: &mut HuffmanBudget,
) -> Result<(Literal<'b>, &'b [u8]), HpackError> {
    let huffman = buf.first().is_some_and(|&b| b & 0x80 != 0);
    let (len, rest) = integer(buf, 7)?;
    if len > rest.len() {
        return Err(HpackError::StringTruncated { len });
    }
    let (raw, rest) = rest.split_at(len);
    if !huffman {
        return Ok((Literal::Raw(raw), rest));
    }
    budget.left = budget
        .left
        .checked_sub(1)
        .ok_or(HpackError::TooManyHuffmanStrings {
            limit: budget.limit,
        })?;
    huffman::decode(raw, scratch)?;
    Ok((Literal::Decoded, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::encode_integer;
    use crate::testutil::*;

    /// The limits the rewriter uses.
    fn decoder() -> Decoder {
        Decoder::new(crate::rewrite::MAX_DYNAMIC_TABLE, usize::MAX)
    }

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn decode(decoder: &mut Decoder, block: &[u8]) -> Result<Fields, HpackError> {
        let mut fields = Vec::new();
        decoder.decode(block, |n, v| {
            fields.push((n.to_vec(), v.to_vec()));
            ControlFlow::Continue(())
        })?;
        Ok(fields)
    }

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn integers_follow_rfc7541_examples() {
        // C.1.1, C.1.2, C.1.3.
        assert_eq!(integer(&[0x0a], 5), Ok((10, &[][..])));
        assert_eq!(
            integer(&[0x1f, 0x9a, 0x0a, 0x33], 5),
            Ok((1337, &[0x33][..]))
        );
        assert_eq!(integer(&[42], 8 - 1), Ok((42, &[][..])));
        assert_eq!(integer(&[0x7f, 0x00], 7), Ok((127, &[][..])));
        // Four continuation bytes are the most.
        assert_eq!(
            integer(&[0x1f, 0xff, 0xff, 0xff, 0x7f], 5),
            Ok((31 + (1 << 28) - 1, &[][..]))
        );
        assert_eq!(
            integer(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0x01], 5),
            Err(HpackError::IntegerTooLong)
        );
        assert_eq!(integer(&[0x1f, 0xff], 5), Err(HpackError::IntegerTruncated));
        assert_eq!(integer(&[], 5), Err(HpackError::IntegerTruncated));
    }

    #[test]
    fn rfc7541_request_examples_decode() {
        // C.3 (raw strings) and C.4 (Huffman), three requests sharing a dynamic table each.
        let raw = [
            "828684410f7777772e6578616d706c652e636f6d",
            "828684be58086e6f2d6361636865",
            "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
        ];
        let huffman = [
            "828684418cf1e3c2e5f23a6ba0ab90f4ff",
            "828684be5886a8eb10649cbf",
            "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
        ];
        let want = [
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ]),
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ]),
            fields(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ]),
        ];
        for blocks in [raw, huffman] {
            let mut decoder = decoder();
            for (block, want) in blocks.iter().zip(&want) {
                assert_eq!(&decode(&mut decoder, &hex(block)).unwrap(), want);
            }
            // 57 + 53 + 54 bytes of entries, newest first.
            assert_eq!(decoder.table.size, 164);
            assert_eq!(decoder.table.entries[0].field().0, b"custom-key");
        }
    }

    #[test]
    fn rfc7541_response_examples_evict() {
        // C.5 with the table limited to 256 bytes, here by a size update in the first block.
        let blocks = [
            concat!(
                "3fe101",
                "4803333032580770726976617465611d4d6f6e2c203231204f637420323031",
                "332032303a31333a323120474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
            ),
            "4803333037c1c0bf",
            concat!(
                "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a",
                "69707738666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d",
                "61782d6167653d333630303b2076657273696f6e3d31",
            ),
        ];
        let mut decoder = decoder();
        let first = decode(&mut decoder, &hex(blocks[0])).unwrap();
        assert_eq!(first[0], (b":status".to_vec(), b"302".to_vec()));
        assert_eq!(decoder.table.size, 222);
        let second = decode(&mut decoder, &hex(blocks[1])).unwrap();
        assert_eq!(second[0], (b":status".to_vec(), b"307".to_vec()));
        // ":status: 302" was evicted to make room for ":status: 307".
        assert_eq!(decoder.table.size, 222);
        let third = decode(&mut decoder, &hex(blocks[2])).unwrap();
        assert_eq!(third.len(), 6);
        assert_eq!(third[5].0, b"set-cookie");
        assert_eq!(decoder.table.size, 215);
        assert_eq!(decoder.table.entries.len(), 3);
    }

    #[test]
    fn malformed_blocks_are_refused() {
        let cases: &[(&[u8], HpackError)] = &[
            (&[0x80], HpackError::BadIndex { index: 0 }),
            (&[0xbe], HpackError::BadIndex { index: 62 }),
            (
                &[0x40 | 0x3f, 0x80, 0x01, 0x00],
                HpackError::BadIndex { index: 191 },
            ),
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                HpackError::IntegerTooLong,
            ),
            (&[0x00, 0x7f], HpackError::IntegerTruncated),
            (&[0x00], HpackError::IntegerTruncated),
            (&[0x41], HpackError::IntegerTruncated),
            (&[0x00, 0x10, b'a'], HpackError::StringTruncated { len: 16 }),
            (&[0x00, 0x81, 0x1e, 0x00], HpackError::HuffmanBadPadding),
            (
                &[0x00, 0x82, 0x1f, 0xff, 0x00],
                HpackError::HuffmanPaddingTooLong,
            ),
            (
                &[0x00, 0x84, 0xff, 0xff, 0xff, 0xfc, 0x00],
                HpackError::HuffmanEos,
            ),
            (
                &[0x3f, 0xe1, 0xff, 0x04, 0x83],
                HpackError::TableSizeTooLarge {
                    size: 31 + 0x61 + (0x7f << 7) + (0x04 << 14),
                    limit: crate::rewrite::MAX_DYNAMIC_TABLE,
                },
            ),
            (&[0x83, 0x20], HpackError::SizeUpdateNotAtStart),
            (
                &[0x20, 0x83, 0x3f, 0x01, 0x84],
                HpackError::SizeUpdateNotAtStart,
            ),
            (&[0x20], HpackError::SizeUpdateAtEnd),
            (&[0x3f, 0x01, 0x20], HpackError::SizeUpdateAtEnd),
        ];
        for (block, want) in cases {
            assert_eq!(decode(&mut decoder(), block), Err(*want), "{block:02x?}");
        }
        // Two size updates at the start are fine (RFC 7541 §4.2).
        assert_eq!(
            decode(&mut decoder(), &[0x20, 0x3f, 0xe1, 0x1f, 0x82]).unwrap(),
            fields(&[(":method", "GET")])
        );
    }

    #[test]
    fn huffman_strings_are_counted_per_block() {
        let block = hex(GRPC_JAVA_BLOCK_1);
        // Ten Huffman-coded strings in this block.
        let mut tight = Decoder::new(crate::rewrite::MAX_DYNAMIC_TABLE, 9);
        assert_eq!(
            decode(&mut tight, &block),
            Err(HpackError::TooManyHuffmanStrings { limit: 9 })
        );
        let mut exact = Decoder::new(crate::rewrite::MAX_DYNAMIC_TABLE, 10);
        decode(&mut exact, &block).unwrap();
        // The budget is per block: the second block has none, a third copy has ten again.
        decode(&mut exact, &hex(GRPC_JAVA_BLOCK_2)).unwrap();
        decode(&mut exact, &block).unwrap();
    }

    #[test]
    fn eviction_makes_room_and_oversized_entries_empty_the_table() {
        let mut decoder = decoder();
        // A 4096-byte table: two entries of 2000 bytes fit, a third evicts the first.
        let value = "v".repeat(2000 - 32 - 1);
        let big = [vec![0x40, 1, b'a'], long_string(&value)].concat();
        for _ in 0..3 {
            decode(&mut decoder, &big).unwrap();
        }
        assert_eq!(decoder.table.entries.len(), 2);
        assert_eq!(decoder.table.size, 4000);
        // An entry larger than the table empties it and is not added, but still decodes.
        let huge = [vec![0x40, 1, b'b'], long_string(&"w".repeat(5000))].concat();
        let got = decode(&mut decoder, &huge).unwrap();
        assert_eq!(got[0].1.len(), 5000);
        assert!(decoder.table.entries.is_empty());
        assert_eq!(decoder.table.size, 0);
        // Shrinking the table evicts; growing it back does not bring entries back.
        decode(&mut decoder, &big).unwrap();
        decode(&mut decoder, &[0x3f, 0x81, 0x0f, 0x82]).unwrap(); // 31 + 1921 = 1952
        assert!(decoder.table.entries.is_empty());
        assert_eq!(
            decode(&mut decoder, &[0x3f, 0xe1, 0x1f, 0xbe]),
            Err(HpackError::BadIndex { index: 62 })
        );
    }

    // --- agreement with an independent decoder ---------------------------------------------

    /// What went wrong, in words both decoders' errors map to.
    fn our_kind(e: &HpackError) -> &'static str {
        match e {
            HpackError::IntegerTruncated => "integer truncated",
            HpackError::IntegerTooLong => "integer too long",
            HpackError::StringTruncated { .. } => "string truncated",
            HpackError::HuffmanPaddingTooLong => "padding too long",
            HpackError::HuffmanBadPadding => "bad padding",
            HpackError::HuffmanEos => "eos",
            HpackError::BadIndex { .. } => "bad index",
            HpackError::TableSizeTooLarge { .. } => "table size too large",
            HpackError::SizeUpdateNotAtStart => "size update not at start",
            HpackError::SizeUpdateAtEnd => "size update at end",
            HpackError::TooManyHuffmanStrings { .. } => "too many huffman strings",
        }
    }

    fn oracle_kind(e: &loona_hpack::decoder::DecoderError) -> &'static str {
        use loona_hpack::decoder::{DecoderError, IntegerDecodingError, StringDecodingError};
        use loona_hpack::huffman::HuffmanDecoderError;
        match e {
            DecoderError::HeaderIndexOutOfBounds => "bad index",
            DecoderError::IntegerDecodingError(IntegerDecodingError::NotEnoughOctets) => {
                "integer truncated"
            }
            DecoderError::IntegerDecodingError(IntegerDecodingError::TooManyOctets) => {
                "integer too long"
            }
            DecoderError::StringDecodingError(StringDecodingError::NotEnoughOctets) => {
                "string truncated"
            }
            DecoderError::StringDecodingError(StringDecodingError::HuffmanDecoderError(h)) => {
                match h {
                    HuffmanDecoderError::PaddingTooLarge => "padding too long",
                    HuffmanDecoderError::InvalidPadding => "bad padding",
                    HuffmanDecoderError::EOSInString => "eos",
                    _ => "other huffman error",
                }
            }
            DecoderError::InvalidMaxDynamicSize => "table size too large",
            DecoderError::SizeUpdateAtEnd => "size update at end",
            _ => "other error",
        }
    }

    /// How the blocks fed to both decoders turned out.
    #[derive(Debug, Default)]
    struct Tally {
        accepted: usize,
        /// Rejected by both, per kind.
        rejected: std::collections::BTreeMap<&'static str, usize>,
        /// Size updates after a field: refused by ours only (the oracle allows them anywhere
        /// but at the end; RFC 7541 §4.2 and h2 do not).
        stricter: usize,
    }

    /// Feeds a connection's blocks to our decoder and to the oracle (each starting fresh, with
    /// the rewriter's size-update limit) and checks that they agree on every field list and on
    /// accept/reject (and why); stops at the first rejected block, after which neither
    /// decoder's state means anything.
    fn agree(blocks: &[Vec<u8>], tally: &mut Tally) {
        let mut ours = decoder();
        let mut oracle = loona_hpack::Decoder::new();
        oracle.set_max_allowed_table_size(crate::rewrite::MAX_DYNAMIC_TABLE);
        for (i, block) in blocks.iter().enumerate() {
            let got = decode(&mut ours, block);
            let want = oracle.decode(block);
            match (got, want) {
                (Ok(got), Ok(want)) => {
                    assert_eq!(got, want, "block {i} of {blocks:02x?}");
                    tally.accepted += 1;
                }
                (Err(HpackError::SizeUpdateNotAtStart), _) => {
                    tally.stricter += 1;
                    return;
                }
                (Err(got), Err(want)) => {
                    assert_eq!(
                        our_kind(&got),
                        oracle_kind(&want),
                        "block {i} of {blocks:02x?}: {got:?} vs {want:?}"
                    );
                    *tally.rejected.entry(our_kind(&got)).or_default() += 1;
                    return;
                }
                (got, want) => panic!("block {i} of {blocks:02x?}: {got:?} vs {want:?}"),
            }
        }
    }

    /// Random bytes, mostly header-like text, sometimes long enough for multi-byte lengths.
    fn random_bytes(rng: &mut XorShift) -> Vec<u8> {
        let len = match rng.below(10) {
            0 => 100 + rng.below(300),
            1 => 0,
            _ => rng.below(24),
        };
        let text = rng.below(4) != 0;
        (0..len)
            .map(|_| {
                if text {
                    b"abcdefghijklmnopqrstuvwxyz0123456789-./:%_~"[rng.below(43)]
                } else {
                    (rng.next_u64() & 0xff) as u8
                }
            })
            .collect()
    }

    /// A string literal: raw or Huffman-coded, now and then broken.
    fn random_literal(rng: &mut XorShift, out: &mut Vec<u8>) {
        let s = random_bytes(rng);
        match rng.below(40) {
            // Huffman flag on random bytes: usually bad padding or EOS.
            0 => {
                encode_integer(out, 0x80, 7, s.len());
                out.extend_from_slice(&s);
            }
            // A length past the end of anything that follows.
            1 => encode_integer(out, 0x00, 7, s.len() + 5000),
            // A valid code with a byte of ones after it (padding too long) or four (EOS).
            2 | 3 => {
                let mut coded = huffman_encode(&s);
                coded.extend(std::iter::repeat_n(
                    0xff,
                    if rng.below(2) == 0 { 1 } else { 4 },
                ));
                encode_integer(out, 0x80, 7, coded.len());
                out.extend_from_slice(&coded);
            }
            n if n < 20 => {
                let coded = huffman_encode(&s);
                encode_integer(out, 0x80, 7, coded.len());
                out.extend_from_slice(&coded);
            }
            _ => {
                encode_integer(out, 0x00, 7, s.len());
                out.extend_from_slice(&s);
            }
        }
    }

    /// An index: mostly in the static table or a plausible dynamic one, now and then 0 or far
    /// out.
    fn random_index(rng: &mut XorShift) -> usize {
        match rng.below(20) {
            0 => 0,
            1 => 62 + rng.below(100_000),
            _ => 1 + rng.below(61 + 12),
        }
    }

    fn random_size_update(rng: &mut XorShift, out: &mut Vec<u8>) {
        let limit = crate::rewrite::MAX_DYNAMIC_TABLE;
        let size = match rng.below(12) {
            0 => limit,
            1 => limit + 1 + rng.below(100_000),
            2 => 0,
            _ => rng.below(5000),
        };
        encode_integer(out, 0x20, 5, size);
    }

    /// A header block of random representations, now and then corrupted.
    fn random_block(rng: &mut XorShift) -> Vec<u8> {
        let mut out = Vec::new();
        if rng.below(5) == 0 {
            for _ in 0..1 + rng.below(2) {
                random_size_update(rng, &mut out);
            }
        }
        for _ in 0..rng.below(9) {
            match rng.below(20) {
                0..=5 => encode_integer(&mut out, 0x80, 7, random_index(rng)),
                6..=15 => {
                    let (first, prefix) = [(0x40, 6), (0x00, 4), (0x10, 4)][rng.below(3)];
                    let index = if rng.below(2) == 0 {
                        0
                    } else {
                        random_index(rng)
                    };
                    encode_integer(&mut out, first, prefix, index);
                    if index == 0 {
                        random_literal(rng, &mut out);
                    }
                    random_literal(rng, &mut out);
                }
                16 => random_size_update(rng, &mut out),
                // An integer that never ends.
                17 => {
                    out.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x80][..1 + rng.below(6)])
                }
                _ => out.push((rng.next_u64() & 0xff) as u8),
            }
        }
        corrupt(rng, &mut out, 10);
        out
    }

    /// One time in `one_in`, cuts `block` short, flips a byte or appends one.
    fn corrupt(rng: &mut XorShift, block: &mut Vec<u8>, one_in: usize) {
        if rng.below(one_in) != 0 {
            return;
        }
        match rng.below(3) {
            0 => block.truncate(rng.below(block.len() + 1)),
            1 if !block.is_empty() => {
                let i = rng.below(block.len());
                block[i] ^= 1 << rng.below(8);
            }
            _ => block.push((rng.next_u64() & 0xff) as u8),
        }
    }

    /// The header blocks of real clients, in connection order.
    fn recorded_connections() -> Vec<Vec<Vec<u8>>> {
        let mut connections = Vec::new();
        let core = hex(GRPC_CORE_RECORDING);
        let (frames, _) = split_frames(&core[PREFACE.len()..]);
        connections.push(
            frames
                .iter()
                .filter(|f| f.kind == 0x1)
                .map(|f| f.payload.clone())
                .collect(),
        );
        connections.push(vec![hex(GRPC_JAVA_BLOCK_1), hex(GRPC_JAVA_BLOCK_2)]);
        connections.push(vec![hex(GRPC_GO_BLOCK_1), hex(GRPC_GO_BLOCK_2)]);
        // RFC 7541 C.3, C.4 (requests) and C.6 (responses, Huffman, a 256-byte table).
        connections.push(
            [
                "828684410f7777772e6578616d706c652e636f6d",
                "828684be58086e6f2d6361636865",
                "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
            ]
            .map(hex)
            .to_vec(),
        );
        connections.push(
            [
                "828684418cf1e3c2e5f23a6ba0ab90f4ff",
                "828684be5886a8eb10649cbf",
                "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
            ]
            .map(hex)
            .to_vec(),
        );
        connections.push(
            [
                concat!(
                    "3fe101488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a6",
                    "2d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3",
                ),
                "4883640effc1c0bf",
                concat!(
                    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7",
                    "821dd7f2e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed",
                    "4ee5b1063d5007",
                ),
            ]
            .map(hex)
            .to_vec(),
        );
        connections
    }

    #[test]
    fn recorded_blocks_decode_as_the_oracle_decodes_them() {
        for connection in recorded_connections() {
            let mut tally = Tally::default();
            agree(&connection, &mut tally);
            assert_eq!(tally.accepted, connection.len(), "{connection:02x?}");
        }
    }

    #[test]
    fn random_blocks_decode_as_the_oracle_decodes_them() {
        let mut rng = XorShift(0x0dd_b10c_5eed_0001);
        let mut tally = Tally::default();
        // Random connections of random blocks sharing a dynamic table.
        for _ in 0..4_000 {
            let blocks: Vec<Vec<u8>> = (0..1 + rng.below(6))
                .map(|_| random_block(&mut rng))
                .collect();
            agree(&blocks, &mut tally);
        }
        // Recorded connections with one block damaged here and there.
        let recorded = recorded_connections();
        for _ in 0..4_000 {
            let mut blocks = recorded[rng.below(recorded.len())].clone();
            for block in &mut blocks {
                corrupt(&mut rng, block, 3);
            }
            agree(&blocks, &mut tally);
        }
        // Every outcome came up, often enough to mean something.
        assert!(tally.accepted > 5_000, "{tally:?}");
        assert!(tally.stricter > 20, "{tally:?}");
        for kind in [
            "integer truncated",
            "integer too long",
            "string truncated",
            "padding too long",
            "bad padding",
            "eos",
            "bad index",
            "table size too large",
            "size update at end",
        ] {
            assert!(
                tally.rejected.get(kind).copied().unwrap_or(0) > 10,
                "{kind}: {tally:?}"
            );
        }
    }

    /// A raw string literal of any length.
    fn long_string(s: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode_integer(&mut out, 0x00, 7, s.len());
        out.extend_from_slice(s.as_bytes());
        out
    }
}
