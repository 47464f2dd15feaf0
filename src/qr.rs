//! QR codes of credential offer URIs, as PNG (email, API) and SVG (landing page, API).
//!
//! Rendering a large image takes milliseconds of CPU: requests get theirs through [`image`],
//! which renders on the blocking pool (never on the async runtime's threads) and keeps recent
//! images in a small cache, since wallets, landing pages and dashboards ask for the same offer
//! repeatedly.

use std::{
    collections::HashMap,
    io::Cursor,
    sync::{Arc, Mutex, OnceLock},
};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Png,
    Svg,
}

/// Cached images at most, and their bytes at most; past either the cache starts over.
const CACHE_ENTRIES: usize = 256;
const CACHE_BYTES: usize = 16 * 1024 * 1024;

type Key = (String, u32, Format);

#[derive(Default)]
struct Cache {
    images: HashMap<Key, Arc<[u8]>>,
    bytes: usize,
}

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// The image of `data` at `size` in `format`, from the cache or rendered on the blocking pool.
pub async fn image(data: &str, size: u32, format: Format) -> Result<Arc<[u8]>, Error> {
    let key: Key = (data.to_owned(), size, format);
    if let Some(hit) = cache()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .images
        .get(&key)
    {
        return Ok(Arc::clone(hit));
    }
    let data = key.0.clone();
    let rendered: Arc<[u8]> = tokio::task::spawn_blocking(move || match format {
        Format::Png => png(&data, size),
        Format::Svg => svg(&data, size).map(String::into_bytes),
    })
    .await
    .map_err(Error::internal)??
    .into();
    let mut cache = cache().lock().unwrap_or_else(|p| p.into_inner());
    if cache.images.len() >= CACHE_ENTRIES || cache.bytes + rendered.len() > CACHE_BYTES {
        cache.images.clear();
        cache.bytes = 0;
    }
    cache.bytes += rendered.len();
    cache.images.insert(key, Arc::clone(&rendered));
    Ok(rendered)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn images_are_rendered_once_and_shared() {
        let uri = "openid-credential-offer://?credential_offer_uri=https%3A%2F%2Fi.example%2Fcache";
        let a = image(uri, 256, Format::Png).await.unwrap();
        let b = image(uri, 256, Format::Png).await.unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "the second request is served from the cache"
        );
        assert_eq!(&a[..], &png(uri, 256).unwrap()[..]);
        let svg = image(uri, 256, Format::Svg).await.unwrap();
        assert!(std::str::from_utf8(&svg).unwrap().contains("<svg"));
    }

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
