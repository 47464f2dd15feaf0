//! QR codes of credential offer URIs, as PNG (email, API) and SVG (landing page, API).

use std::io::Cursor;

use issuer_domain::Error;
use qrcode::{EcLevel, QrCode, render::svg};

/// Side of the image in pixels when the caller names none.
pub const DEFAULT_SIZE: u32 = 320;
/// The range a caller may ask for.
pub const SIZES: std::ops::RangeInclusive<u32> = 128..=2048;

/// Medium error correction: readable from a phone held at a slant or a slightly blurred
/// screen, at the density an offer URI of ~150 characters needs.
fn code(data: &str) -> Result<QrCode, Error> {
    QrCode::with_error_correction_level(data.as_bytes(), EcLevel::M).map_err(Error::internal)
}

/// A PNG at least `size` pixels wide, black on white, with the standard quiet zone.
pub fn png(data: &str, size: u32) -> Result<Vec<u8>, Error> {
    let image = code(data)?
        .render::<image::Luma<u8>>()
        .min_dimensions(size, size)
        .quiet_zone(true)
        .build();
    let mut out = Vec::new();
    image::DynamicImage::ImageLuma8(image)
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(Error::internal)?;
    Ok(out)
}

/// An SVG document at least `size` pixels wide, black on white, with the quiet zone.
pub fn svg(data: &str, size: u32) -> Result<String, Error> {
    Ok(code(data)?
        .render::<svg::Color<'_>>()
        .min_dimensions(size, size)
        .quiet_zone(true)
        .dark_color(svg::Color("#000000"))
        .light_color(svg::Color("#ffffff"))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    const URI: &str = "openid-credential-offer://?credential_offer_uri=https%3A%2F%2Fissuer.example%2Fissuer%2Foid4vci%2Fv1%2Fcredential-offer%2FAbCdEfGhIjKlMnOpQrStUvWx";

    #[test]
    fn png_decodes_to_the_data() {
        let png = png(URI, 256).unwrap();
        let image = image::load_from_memory(&png).unwrap().to_luma8();
        assert!(image.width() >= 256);
        let mut prepared = rqrr::PreparedImage::prepare(image);
        let grids = prepared.detect_grids();
        assert_eq!(grids.len(), 1);
        let (_, content) = grids[0].decode().unwrap();
        assert_eq!(content, URI);
    }

    #[test]
    fn svg_is_a_document_of_the_asked_size() {
        let svg = svg(URI, 300).unwrap();
        assert!(svg.starts_with("<?xml"), "{}", &svg[..40]);
        assert!(svg.contains("<svg"));
        let width: u32 = svg
            .split("width=\"")
            .nth(1)
            .and_then(|w| w.split('"').next())
            .and_then(|w| w.parse().ok())
            .unwrap();
        assert!(width >= 300, "width {width}");
    }
}
