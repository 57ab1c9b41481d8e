//! QR codes of device configs, for the WireGuard phone apps' "scan from QR code". Pure: text in, PNG bytes, an SVG
//! document or terminal text out.
//!
//! The `qrcode` crate encodes and renders SVG and Unicode; PNG is written here from its module matrix with the small
//! `png` crate (qrcode's own PNG path pulls in the whole `image` crate). Error correction is M (15% of the code may be
//! damaged or glared) when the text fits, else L, which holds the longest texts (about 2,900 bytes: a config with a
//! dozen peers).

use qrcode::render::{svg, unicode};
use qrcode::types::QrError;
use qrcode::{Color, EcLevel, QrCode};

/// Pixels per module side in PNG output: small codes stay large enough to scan from a screen across a desk.
pub const PNG_MODULE_PIXELS: u32 = 8;
/// Light modules around the code, as ISO/IEC 18004 requires.
pub const QUIET_ZONE_MODULES: u32 = 4;

/// Why a text has no QR code.
#[derive(Debug, thiserror::Error)]
pub enum QrCodeError {
    #[error(
        "the config is {len} bytes, too long for a QR code (at most about 2,900); download the file instead \
         (format=conf), or register fewer peers for the device"
    )]
    TooLong { len: usize },
    #[error("encoding the QR code: {0}")]
    Encode(String),
}

fn encode(text: &str) -> Result<QrCode, QrCodeError> {
    match QrCode::with_error_correction_level(text, EcLevel::M) {
        Ok(code) => Ok(code),
        Err(QrError::DataTooLong) => QrCode::with_error_correction_level(text, EcLevel::L).map_err(|e| match e {
            QrError::DataTooLong => QrCodeError::TooLong { len: text.len() },
            other => QrCodeError::Encode(other.to_string()),
        }),
        Err(other) => Err(QrCodeError::Encode(other.to_string())),
    }
}

/// `text` as a greyscale PNG, [`PNG_MODULE_PIXELS`] pixels per module, quiet zone included.
pub fn png(text: &str) -> Result<Vec<u8>, QrCodeError> {
    let code = encode(text)?;
    let modules = code.width() as u32;
    let colors = code.to_colors();
    let side_modules = modules + 2 * QUIET_ZONE_MODULES;
    let side = side_modules * PNG_MODULE_PIXELS;
    let mut pixels = vec![0xffu8; (side * side) as usize];
    for (index, color) in colors.iter().enumerate() {
        if *color != Color::Dark {
            continue;
        }
        let (x, y) = (index as u32 % modules, index as u32 / modules);
        let (left, top) = (
            (x + QUIET_ZONE_MODULES) * PNG_MODULE_PIXELS,
            (y + QUIET_ZONE_MODULES) * PNG_MODULE_PIXELS,
        );
        for row in top..top + PNG_MODULE_PIXELS {
            let start = (row * side + left) as usize;
            pixels[start..start + PNG_MODULE_PIXELS as usize].fill(0);
        }
    }
    let mut out = Vec::new();
    let mut encoder = ::png::Encoder::new(&mut out, side, side);
    encoder.set_color(::png::ColorType::Grayscale);
    encoder.set_depth(::png::BitDepth::Eight);
    let written = encoder
        .write_header()
        .and_then(|mut writer| {
            writer.write_image_data(&pixels)?;
            writer.finish()
        })
        .map_err(|e| QrCodeError::Encode(format!("writing the PNG: {e}")));
    written?;
    Ok(out)
}

/// `text` as an SVG document (black on white, quiet zone included).
pub fn svg(text: &str) -> Result<String, QrCodeError> {
    let code = encode(text)?;
    Ok(code
        .render::<svg::Color<'_>>()
        .min_dimensions(256, 256)
        .quiet_zone(true)
        .build())
}

/// `text` as lines of Unicode half blocks (two modules per character cell) for a terminal. Drawn light-on-dark:
/// terminals usually have a dark background, so the code's light modules are the printed blocks.
pub fn terminal(text: &str) -> Result<String, QrCodeError> {
    let code = encode(text)?;
    Ok(code
        .render::<unicode::Dense1x2>()
        .dark_color(unicode::Dense1x2::Light)
        .light_color(unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "[Interface]\nPrivateKey = <paste this device's private key here>\nAddress = 10.77.0.4/32\n\
                          DNS = 10.77.0.2, mesh.internal\n\n[Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n\
                          AllowedIPs = 10.77.0.2/32\nEndpoint = vpn.example.com:51820\nPersistentKeepalive = 25\n";

    /// Decodes a greyscale PNG and reads the QR code in it.
    fn decode_png(bytes: &[u8]) -> (u32, u32, String) {
        let decoder = ::png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("png header");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buf).expect("png frame");
        let (w, h) = (info.width as usize, info.height as usize);
        let mut image = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| buf[y * w + x]);
        let grids = image.detect_grids();
        assert_eq!(grids.len(), 1, "one QR code in the image");
        let (_, text) = grids[0].decode().expect("QR decodes");
        (info.width, info.height, text)
    }

    #[test]
    fn png_has_the_signature_plausible_size_and_decodes_to_the_text() {
        let bytes = png(CONFIG).expect("png");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let (w, h, text) = decode_png(&bytes);
        assert_eq!(w, h);
        // At least version 1 (21 modules) plus the quiet zone; at most version 40 (177).
        assert!(((21 + 8) * PNG_MODULE_PIXELS..=(177 + 8) * PNG_MODULE_PIXELS).contains(&w));
        assert_eq!(w % PNG_MODULE_PIXELS, 0);
        assert_eq!(text, CONFIG);
    }

    #[test]
    fn svg_is_one_svg_document_with_modules() {
        let doc = svg(CONFIG).expect("svg");
        assert!(doc.starts_with("<?xml"));
        assert_eq!(doc.matches("<svg").count(), 1);
        assert!(doc.trim_end().ends_with("</svg>"));
        assert!(doc.contains("<path") && doc.contains("fill=\"#000\""));
    }

    #[test]
    fn terminal_code_is_square_half_block_lines() {
        let text = terminal(CONFIG).expect("terminal");
        let lines: Vec<&str> = text.lines().collect();
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width));
        // Two modules per line: a square code is half as many lines as it is wide (rounded up).
        assert_eq!(lines.len(), width.div_ceil(2));
        assert!(
            text.chars()
                .all(|c| matches!(c, ' ' | '\u{2580}' | '\u{2584}' | '\u{2588}' | '\n'))
        );
    }

    #[test]
    fn too_long_a_text_is_refused_with_advice() {
        let long = "x".repeat(5000);
        let err = png(&long).expect_err("too long");
        assert!(matches!(err, QrCodeError::TooLong { len: 5000 }));
        assert!(err.to_string().contains("format=conf"));
        // Between M's and L's capacity: L still holds it.
        assert!(svg(&"y".repeat(2500)).is_ok());
    }
}
