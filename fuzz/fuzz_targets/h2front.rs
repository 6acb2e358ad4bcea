//! Arbitrary client bytes after a valid HTTP/2 preface, through the `:authority` rewriter.
//!
//! Checks: no panic (libFuzzer catches it); when the rewriter accepts the input, every header
//! block in its output decodes with a fresh HPACK decoder whose dynamic table is empty and
//! stays at size 0 (so the output never relies on the dynamic table), each frame of it fits
//! the default SETTINGS_MAX_FRAME_SIZE, and no `:authority` in it contains '/' or '%'.
#![no_main]

use libfuzzer_sys::fuzz_target;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(data);
    if let Ok(output) = spiffed_h2front::rewrite_all(&input) {
        check(&output);
    }
});

fn check(output: &[u8]) {
    assert!(output.starts_with(PREFACE), "preface lost");
    let mut rest = &output[PREFACE.len()..];
    // The header block being collected: its stream and the fragments so far.
    let mut open: Option<(u32, Vec<u8>)> = None;
    // A frame passed through may be cut off at the end of the input; stop there.
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
        let Some(payload) = rest.get(9..9 + len) else {
            break;
        };
        rest = &rest[9 + len..];
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
            len <= 16_384,
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
        for (name, value) in fields {
            if name == b":authority" {
                assert!(
                    !value.iter().any(|&b| b == b'/' || b == b'%'),
                    "authority kept: {value:?}"
                );
            }
        }
    }
    assert!(open.is_none(), "header block left open");
}
