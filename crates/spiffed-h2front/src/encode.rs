//! A stateless HPACK encoder: static-table references and literals without indexing.
//!
//! Nothing written here touches the decoder's dynamic table (RFC 7541 §6.1 indexed fields that
//! name the static table, §6.2.2 literals without indexing) and no dynamic table size update is
//! ever emitted, so the server's decoder keeps an empty dynamic table for the whole connection.
//! Strings are written raw (Huffman coding is optional, §5.2).

use crate::hpack::STATIC_TABLE;

/// How a field can refer to the static table.
#[derive(Debug, PartialEq)]
enum StaticMatch {
    /// Name and value both match the entry with this index.
    Field(usize),
    /// Only the name matches the entry with this index.
    Name(usize),
    /// The name is not in the static table.
    None,
}

/// The static table entries that carry `name`: the index of the first and how many there are
/// (consecutive in the table). One `match` rather than a scan of the table: this runs for
/// every field of every re-encoded block.
fn static_name(name: &[u8]) -> Option<(usize, usize)> {
    Some(match name {
        b":authority" => (1, 1),
        b":method" => (2, 2),
        b":path" => (4, 2),
        b":scheme" => (6, 2),
        b":status" => (8, 7),
        b"accept-charset" => (15, 1),
        b"accept-encoding" => (16, 1),
        b"accept-language" => (17, 1),
        b"accept-ranges" => (18, 1),
        b"accept" => (19, 1),
        b"access-control-allow-origin" => (20, 1),
        b"age" => (21, 1),
        b"allow" => (22, 1),
        b"authorization" => (23, 1),
        b"cache-control" => (24, 1),
        b"content-disposition" => (25, 1),
        b"content-encoding" => (26, 1),
        b"content-language" => (27, 1),
        b"content-length" => (28, 1),
        b"content-location" => (29, 1),
        b"content-range" => (30, 1),
        b"content-type" => (31, 1),
        b"cookie" => (32, 1),
        b"date" => (33, 1),
        b"etag" => (34, 1),
        b"expect" => (35, 1),
        b"expires" => (36, 1),
        b"from" => (37, 1),
        b"host" => (38, 1),
        b"if-match" => (39, 1),
        b"if-modified-since" => (40, 1),
        b"if-none-match" => (41, 1),
        b"if-range" => (42, 1),
        b"if-unmodified-since" => (43, 1),
        b"last-modified" => (44, 1),
        b"link" => (45, 1),
        b"location" => (46, 1),
        b"max-forwards" => (47, 1),
        b"proxy-authenticate" => (48, 1),
        b"proxy-authorization" => (49, 1),
        b"range" => (50, 1),
        b"referer" => (51, 1),
        b"refresh" => (52, 1),
        b"retry-after" => (53, 1),
        b"server" => (54, 1),
        b"set-cookie" => (55, 1),
        b"strict-transport-security" => (56, 1),
        b"transfer-encoding" => (57, 1),
        b"user-agent" => (58, 1),
        b"vary" => (59, 1),
        b"via" => (60, 1),
        b"www-authenticate" => (61, 1),
        _ => return None,
    })
}

fn static_match(name: &[u8], value: &[u8]) -> StaticMatch {
    let Some((first, count)) = static_name(name) else {
        return StaticMatch::None;
    };
    let values = STATIC_TABLE
        .get(first - 1..first - 1 + count)
        .unwrap_or_default();
    match values.iter().position(|&(_, v)| v == value) {
        Some(i) => StaticMatch::Field(first + i),
        None => StaticMatch::Name(first),
    }
}

/// Appends one header field to `out` without touching any dynamic table.
pub(crate) fn encode_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    match static_match(name, value) {
        // §6.1 Indexed Header Field, static index only.
        StaticMatch::Field(index) => encode_integer(out, 0x80, 7, index),
        // §6.2.2 Literal Header Field without Indexing, indexed name.
        StaticMatch::Name(index) => {
            encode_integer(out, 0x00, 4, index);
            encode_string(out, value);
        }
        // §6.2.2 Literal Header Field without Indexing, new name.
        StaticMatch::None => {
            out.push(0x00);
            encode_string(out, name);
            encode_string(out, value);
        }
    }
}

/// §5.2 string literal, raw (H bit clear).
fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    encode_integer(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// §5.1 integer with an `prefix_bits`-bit prefix; `first` carries the representation's flag bits.
pub(crate) fn encode_integer(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut value: usize) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        // Fits in the prefix: `value < max_prefix <= 127`, so the cast is lossless.
        out.push(first | value as u8);
        return;
    }
    out.push(first | max_prefix as u8);
    value -= max_prefix;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut decoder = loona_hpack::Decoder::new();
        // A stateless block decodes even with a zero-size dynamic table.
        decoder.set_max_table_size(0);
        decoder.decode(block).unwrap()
    }

    #[test]
    fn integers_follow_rfc7541_examples() {
        // C.1.1: 10 with a 5-bit prefix; C.1.2: 1337 with a 5-bit prefix.
        let mut out = Vec::new();
        encode_integer(&mut out, 0, 5, 10);
        assert_eq!(out, [10]);
        out.clear();
        encode_integer(&mut out, 0, 5, 1337);
        assert_eq!(out, [31, 154, 10]);
        out.clear();
        encode_integer(&mut out, 0x80, 7, 127);
        assert_eq!(out, [0xff, 0x00]);
    }

    #[test]
    fn static_matches_agree_with_a_scan_of_the_table() {
        let scan = |name: &[u8], value: &[u8]| {
            let field = STATIC_TABLE
                .iter()
                .position(|&(n, v)| n == name && v == value);
            let name = STATIC_TABLE.iter().position(|&(n, _)| n == name);
            match (field, name) {
                (Some(i), _) => StaticMatch::Field(i + 1),
                (None, Some(i)) => StaticMatch::Name(i + 1),
                (None, None) => StaticMatch::None,
            }
        };
        let mut cases: Vec<(&[u8], &[u8])> = STATIC_TABLE.to_vec();
        for &(n, _) in &STATIC_TABLE {
            cases.push((n, b"other"));
        }
        cases.extend([
            (&b"te"[..], &b"trailers"[..]),
            (b"", b""),
            (b":Authority", b""),
            (b"content-typ", b"application/grpc"),
            (b"grpc-timeout", b"1S"),
        ]);
        for (name, value) in cases {
            assert_eq!(
                static_match(name, value),
                scan(name, value),
                "{:?}: {:?}",
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn fields_round_trip_through_a_fresh_decoder() {
        let long = vec![b'x'; 70_000];
        let fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"workload.spiffe.io", b"true"),
            (b"x-long", &long),
            (b"www-authenticate", b""),
        ];
        let mut out = Vec::new();
        for (n, v) in &fields {
            encode_field(&mut out, n, v);
        }
        // `:method: POST` and `:scheme: http` are single static references.
        assert_eq!(out[..2], [0x83, 0x86]);
        let decoded = decode(&out);
        let want: Vec<(Vec<u8>, Vec<u8>)> = fields
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(decoded, want);
    }
}
