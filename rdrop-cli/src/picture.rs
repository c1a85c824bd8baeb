//! The PNGs rdrop draws (`curves.png`, `rdrop data preview`): plotters draws into an RGB
//! buffer and image writes it, so that one `image` serves the whole binary, and the text font
//! is embedded once.

use std::path::Path;
use std::sync::Once;

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::{BitMapBackend, DrawingArea, IntoDrawingArea};
use plotters::style::FontStyle;

/// Text font of every picture (DejaVu Sans Mono, Bitstream Vera licence; see
/// assets/README.md).
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");

/// The family the font is registered as: plotters' default, so that text drawn without a
/// family gets it too.
pub const FAMILY: &str = "sans-serif";

/// The drawing area over a picture's pixels.
pub type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Draws with `draw` over `pixels` (`width × height` RGB, row after row) and writes the
/// result to `out` (PNG, or as its extension says). An error of `draw` comes back with the
/// file named.
pub fn draw_png(
    out: &Path,
    mut pixels: Vec<u8>,
    (width, height): (u32, u32),
    draw: impl FnOnce(&Area<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    register_font();
    {
        let area = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        draw(&area)
            .and_then(|()| area.present().map_err(|e| anyhow::anyhow!("{e}")))
            .with_context(|| format!("drawing {}", out.display()))?;
    }
    image::save_buffer(out, &pixels, width, height, image::ColorType::Rgb8)
        .with_context(|| format!("cannot write {}", out.display()))
}

/// Registers [`FONT`] as [`FAMILY`], once per process; if it cannot, text may be missing.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            eprintln!("warning: the embedded font could not be loaded; text may be missing");
        }
    });
}
