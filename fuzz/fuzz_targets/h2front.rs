//! Arbitrary client bytes after a valid HTTP/2 preface, through the `:authority` rewriter.
//!
//! Checks: no panic (libFuzzer catches it), and when the rewriter accepts the input, what it
//! promises about the output:
//! - everything before the connection's first complete header block is unchanged;
//! - that block decodes (with a fresh, independent HPACK decoder) and then either
//!   - kept its HPACK bytes (pass-through): every `:authority` in it is plain (no '/' or '%'),
//!     and every byte after it is unchanged; or
//!   - was re-encoded (rewrite): it carries the same fields with at least one `:authority`
//!     replaced by `localhost`, and every header block of the output decodes with a fresh decoder
//!     whose dynamic table stays at size 0 (the output never relies on the dynamic table), each
//!     frame of it fits the default SETTINGS_MAX_FRAME_SIZE, PADDED is dropped, and no
//!     `:authority` in it contains '/' or '%'.
#![no_main]

use libfuzzer_sys::fuzz_target;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(data);
    if let Ok(output) = spiffed_h2front::rewrite_all(&input) {
        check(&input, &output);
    }
});

/// One frame: (offset, type, flags, stream, payload); `None` at the end or a cut-off frame.
fn frame_at(bytes: &[u8], pos: usize) -> Option<(u8, u8, u32, &[u8])> {
    let head = bytes.get(pos..pos + 9)?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let payload = bytes.get(pos + 9..pos + 9 + len)?;
    Some((head[3], head[4], stream, payload))
}

/// The first complete header block after the preface: (start, end, HPACK bytes).
fn first_block(bytes: &[u8]) -> Option<(usize, usize, Vec<u8>)> {
    let mut pos = PREFACE.len();
    let mut open: Option<(usize, Vec<u8>)> = None;
    while let Some((kind, flags, _, payload)) = frame_at(bytes, pos) {
        let start = pos;
        pos += 9 + payload.len();
        let (block_start, fragment) = match (kind, open.take()) {
            (0x9, Some((block_start, mut fragment))) => {
                fragment.extend_from_slice(payload);
                (block_start, fragment)
            }
            (0x1, None) => {
                let mut p = payload;
                let mut pad = 0;
                if flags & 0x8 != 0 {
                    pad = usize::from(*p.first()?);
                    p = &p[1..];
                }
                if flags & 0x20 != 0 {
                    p = p.get(5..)?;
                }
                (start, p.get(..p.len().checked_sub(pad)?)?.to_vec())
            }
            (_, Some(_)) => return None,
            _ => continue,
        };
        if flags & 0x4 != 0 {
            return Some((block_start, pos, fragment));
        }
        open = Some((block_start, fragment));
    }
    None
}

fn authorities(fields: &[(Vec<u8>, Vec<u8>)]) -> impl Iterator<Item = &[u8]> {
    fields
        .iter()
        .filter(|(n, _)| n == b":authority")
        .map(|(_, v)| v.as_slice())
}

fn plain(authority: &[u8]) -> bool {
    !authority.is_empty() && !authority.iter().any(|&b| b == b'/' || b == b'%')
}

fn check(input: &[u8], output: &[u8]) {
    assert!(output.starts_with(PREFACE), "preface lost");
    let ((in_start, in_end, in_block), (out_start, out_end, out_block)) =
        match (first_block(input), first_block(output)) {
            (None, None) => {
                assert!(input.starts_with(output), "output before any header block");
                return;
            }
            (Some(i), Some(o)) => (i, o),
            (i, o) => panic!("first header block: input {i:?}, output {o:?}"),
        };
    assert_eq!(
        output[..out_start],
        input[..in_start],
        "bytes before the first block"
    );
    let mut decoder = loona_hpack::Decoder::new();
    decoder.set_max_allowed_table_size(64 * 1024);
    let fields = decoder
        .decode(&in_block)
        .unwrap_or_else(|e| panic!("accepted first block does not decode: {e:?}"));
    if out_block == in_block {
        assert!(
            authorities(&fields).all(plain),
            "passed through: {fields:?}"
        );
        assert_eq!(
            output[out_end..],
            input[in_end..],
            "bytes after a plain first block"
        );
    } else {
        // The same fields, with at least one `:authority` replaced by `localhost`.
        let mut stateless = loona_hpack::Decoder::new();
        stateless.set_max_table_size(0);
        let rewritten = stateless
            .decode(&out_block)
            .unwrap_or_else(|e| panic!("re-encoded first block does not decode: {e:?}"));
        assert_eq!(rewritten.len(), fields.len());
        let mut replaced = false;
        for ((n, v), (rn, rv)) in fields.iter().zip(&rewritten) {
            assert_eq!(n, rn);
            if v != rv {
                assert!(
                    n == b":authority" && rv == b"localhost",
                    "{n:?}: {v:?} -> {rv:?}"
                );
                replaced = true;
            }
        }
        assert!(replaced, "re-encoded with nothing replaced: {fields:?}");
        check_stateless(output);
    }
}

/// Every header block in `output` decodes without the dynamic table, and has no odd authority.
fn check_stateless(output: &[u8]) {
    let mut pos = PREFACE.len();
    // The header block being collected: its stream and the fragments so far.
    let mut open: Option<(u32, Vec<u8>)> = None;
    // A frame passed through may be cut off at the end of the input; stop there.
    while let Some((kind, flags, stream, payload)) = frame_at(output, pos) {
        pos += 9 + payload.len();
        let fragment = match (kind, open.take()) {
            (0x9, Some((open_stream, mut block))) => {
                assert_eq!(stream, open_stream, "continuation for another stream");
                block.extend_from_slice(payload);
                (stream, block)
            }
            (_, Some(_)) => panic!("header block left open before frame type {kind:#x}"),
            (0x1, None) => {
                assert_eq!(flags & 0x8, 0, "padding must be dropped");
                let payload = if flags & 0x20 != 0 {
                    &payload[5..]
                } else {
                    payload
                };
                (stream, payload.to_vec())
            }
            // Everything else, stray CONTINUATION frames included, passed through unchanged.
            _ => continue,
        };
        assert!(
            payload.len() <= 16_384,
            "frame larger than the default max frame size"
        );
        if flags & 0x4 == 0 {
            open = Some(fragment);
            continue;
        }
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_table_size(0);
        let fields = decoder
            .decode(&fragment.1)
            .unwrap_or_else(|e| panic!("output header block does not decode statelessly: {e:?}"));
        assert!(
            authorities(&fields).all(plain),
            "authority kept: {fields:?}"
        );
    }
    assert!(open.is_none(), "header block left open");
}
