//! A stateless HPACK encoder: static-table references and literals without indexing.
//!
//! Nothing written here touches the decoder's dynamic table (RFC 7541 §6.1 indexed fields that
//! name the static table, §6.2.2 literals without indexing) and no dynamic table size update is
//! ever emitted, so the server's decoder keeps an empty dynamic table for the whole connection.
//! Strings are written raw (Huffman coding is optional, §5.2).

/// The HPACK static table (RFC 7541 Appendix A); entry `i` has index `i + 1`.
const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
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

/// How a field can refer to the static table.
enum StaticMatch {
    /// Name and value both match the entry with this index.
    Field(usize),
    /// Only the name matches the entry with this index.
    Name(usize),
    /// The name is not in the static table.
    None,
}

fn static_match(name: &[u8], value: &[u8]) -> StaticMatch {
    let mut name_index = None;
    for (i, &(n, v)) in STATIC_TABLE.iter().enumerate() {
        if n == name {
            if v == value {
                return StaticMatch::Field(i + 1);
            }
            name_index.get_or_insert(i + 1);
        }
    }
    name_index.map_or(StaticMatch::None, StaticMatch::Name)
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
fn encode_integer(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut value: usize) {
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
