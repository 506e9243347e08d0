//! Image input for the model: decoding with EXIF orientation and size limits, and
//! Moondream2's crop preparation (Pillow-exact Lanczos resize, overlapping tiles,
//! bfloat16 normalisation). Knows nothing of tensors' devices or of the queue.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

/// Limits that keep a hostile file from exhausting memory while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest width or height accepted, in pixels.
    pub max_side: u32,
    /// Largest width × height accepted, in pixels.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_side: 16_384,
            max_pixels: 100_000_000,
        }
    }
}

/// Why an image could not be turned into model input.
#[derive(Debug, thiserror::Error)]
pub enum ImageInputError {
    /// The bytes are not an image format captiond reads.
    #[error("unsupported or unrecognised image format")]
    UnsupportedFormat,
    /// The file is empty.
    #[error("the image file is empty")]
    Empty,
    /// The header declares more pixels than the limits allow.
    #[error(
        "image is {width}x{height}, beyond the decode limit ({max_side} px per side, {max_pixels} pixels)"
    )]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// Side limit in force.
        max_side: u32,
        /// Pixel-count limit in force.
        max_pixels: u64,
    },
    /// The decoder failed (truncated or corrupt data).
    #[error("cannot decode image: {0}")]
    Decode(String),
}

/// Decodes image bytes to RGB, applying the EXIF orientation (all eight values) and
/// refusing images beyond `limits` before allocating their pixels.
pub fn decode_rgb(bytes: &[u8], limits: DecodeLimits) -> Result<RgbImage, ImageInputError> {
    if bytes.is_empty() {
        return Err(ImageInputError::Empty);
    }
    let reader = || -> Result<ImageReader<Cursor<&[u8]>>, ImageInputError> {
        let r = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageInputError::Decode(e.to_string()))?;
        if r.format().is_none() {
            return Err(ImageInputError::UnsupportedFormat);
        }
        Ok(r)
    };
    // The header alone tells the size: refuse bombs before any pixel is allocated.
    let (width, height) = reader()?.into_dimensions().map_err(map_image_error)?;
    let too_large = width > limits.max_side
        || height > limits.max_side
        || u64::from(width) * u64::from(height) > limits.max_pixels;
    if too_large {
        return Err(ImageInputError::TooLarge {
            width,
            height,
            max_side: limits.max_side,
            max_pixels: limits.max_pixels,
        });
    }
    let mut r = reader()?;
    let mut lim = image::Limits::default();
    lim.max_image_width = Some(limits.max_side);
    lim.max_image_height = Some(limits.max_side);
    lim.max_alloc = Some(limits.max_pixels.saturating_mul(8).max(64 << 20));
    r.limits(lim);
    let mut decoder = r.into_decoder().map_err(map_image_error)?;
    let orientation = decoder.orientation().map_err(map_image_error)?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(map_image_error)?;
    img.apply_orientation(orientation);
    Ok(img.to_rgb8())
}

fn map_image_error(e: image::ImageError) -> ImageInputError {
    match e {
        image::ImageError::Unsupported(_) => ImageInputError::UnsupportedFormat,
        image::ImageError::Limits(l) => {
            ImageInputError::Decode(format!("decode limit exceeded: {l}"))
        }
        other => ImageInputError::Decode(other.to_string()),
    }
}

/// How an image is cut into local crops: rows × columns of tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    /// Tile rows.
    pub rows: usize,
    /// Tile columns.
    pub cols: usize,
}

/// Crop geometry derived from the vision config.
#[derive(Debug, Clone, Copy)]
pub struct CropGeometry {
    /// Side of a crop in pixels (378).
    pub crop_size: usize,
    /// Overlap per side in pixels (margin × patch = 56).
    pub margin_px: usize,
    /// Most local crops.
    pub max_crops: usize,
}

impl CropGeometry {
    /// The usable window of each tile after removing the margins (266).
    pub fn window(&self) -> usize {
        self.crop_size - 2 * self.margin_px
    }

    /// The reference `select_tiling`, applied to an image of `height` × `width`.
    pub fn tiling(&self, height: usize, width: usize) -> Tiling {
        let h = height as f64 - (2 * self.margin_px) as f64;
        let w = width as f64 - (2 * self.margin_px) as f64;
        let t = self.window() as f64;
        let max = self.max_crops as f64;
        if h <= t || w <= t {
            return Tiling { rows: 1, cols: 1 };
        }
        let min_h = (h / t).ceil();
        let min_w = (w / t).ceil();
        if min_h * min_w > max {
            let r = (max / (min_h * min_w)).sqrt();
            return Tiling {
                rows: ((min_h * r).floor() as usize).max(1),
                cols: ((min_w * r).floor() as usize).max(1),
            };
        }
        let mut th = (max * h / w).sqrt().floor().max(min_h);
        let mut tw = (max * w / h).sqrt().floor().max(min_w);
        if th * tw > max {
            if tw > th {
                tw = (max / th).floor();
            } else {
                th = (max / tw).floor();
            }
        }
        Tiling {
            rows: (th as usize).max(1),
            cols: (tw as usize).max(1),
        }
    }
}

/// Model-ready crops: `[n_crops, 3, side, side]` normalised values, global crop first.
#[derive(Debug, Clone)]
pub struct Crops {
    /// Row-major NCHW data.
    pub data: Vec<f32>,
    /// Number of crops (1 global + rows × cols local).
    pub n_crops: usize,
    /// Side of each crop.
    pub side: usize,
    /// Tiling of the local crops.
    pub tiling: Tiling,
}

/// Cuts an RGB image into the global crop plus overlapping local crops, exactly as the
/// reference `prepare_crops` does with Pillow, and normalises them with [`pixel_norm_lut`].
pub fn prepare_crops(img: &RgbImage, geo: &CropGeometry) -> Crops {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let tiling = geo.tiling(h, w);
    let side = geo.crop_size;
    let lut = pixel_norm_lut();
    let n_crops = 1 + tiling.rows * tiling.cols;
    let mut data = Vec::with_capacity(n_crops * 3 * side * side);
    let global = resize_lanczos(img, side, side);
    push_crop(&mut data, &global, 0, 0, side, &lut);
    let win = geo.window();
    let full = resize_lanczos(
        img,
        tiling.cols * win + 2 * geo.margin_px,
        tiling.rows * win + 2 * geo.margin_px,
    );
    for i in 0..tiling.rows {
        for j in 0..tiling.cols {
            push_crop(&mut data, &full, i * win, j * win, side, &lut);
        }
    }
    Crops {
        data,
        n_crops,
        side,
        tiling,
    }
}

fn push_crop(
    out: &mut Vec<f32>,
    img: &RgbImage,
    top: usize,
    left: usize,
    side: usize,
    lut: &[f32; 256],
) {
    let raw = img.as_raw();
    let stride = img.width() as usize * 3;
    for c in 0..3 {
        for y in top..top + side {
            let row = &raw[y * stride..(y + 1) * stride];
            out.extend((left..left + side).map(|x| lut[row[x * 3 + c] as usize]));
        }
    }
}

/// The reference normalisation `((v/255) - 0.5) / 0.5` computed in bfloat16, each step
/// rounded, for every uint8 value.
pub fn pixel_norm_lut() -> [f32; 256] {
    use half::bf16;
    let mut lut = [0f32; 256];
    for (v, slot) in lut.iter_mut().enumerate() {
        let x = bf16::from_f32(v as f32);
        let x = bf16::from_f32(x.to_f32() / 255.0);
        let x = bf16::from_f32(x.to_f32() - 0.5);
        let x = bf16::from_f32(x.to_f32() / 0.5);
        *slot = x.to_f32();
    }
    lut
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per-output-pixel filter taps in Pillow's fixed-point form.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

fn lanczos(x: f64) -> f64 {
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    }
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

fn taps(n_in: usize, n_out: usize) -> Taps {
    let scale = n_in as f64 / n_out as f64;
    let filterscale = scale.max(1.0);
    let support = 3.0 * filterscale;
    let ss = 1.0 / filterscale;
    let mut start = Vec::with_capacity(n_out);
    let mut weights = Vec::with_capacity(n_out);
    for o in 0..n_out {
        let center = (o as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
        let raw: Vec<f64> = (xmin..xmax)
            .map(|x| lanczos((x as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|w| {
                let w = if total != 0.0 { w / total } else { *w };
                let f = w * f64::from(1u32 << PRECISION_BITS);
                if w < 0.0 {
                    (f - 0.5) as i32
                } else {
                    (f + 0.5) as i32
                }
            })
            .collect();
        start.push(xmin);
        weights.push(fixed);
    }
    Taps { start, weights }
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize(..., LANCZOS)` for 8-bit RGB: horizontal pass first into a
/// uint8 intermediate, then vertical; a pass is skipped when its size is unchanged.
pub fn resize_lanczos(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let horizontal = if in_w != out_w {
        let t = taps(in_w, out_w);
        let src = img.as_raw();
        let mut dst = vec![0u8; out_w * in_h * 3];
        for y in 0..in_h {
            let row = &src[y * in_w * 3..(y + 1) * in_w * 3];
            for x in 0..out_w {
                for c in 0..3 {
                    let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                    for (k, w) in t.weights[x].iter().enumerate() {
                        acc += i32::from(row[(t.start[x] + k) * 3 + c]) * w;
                    }
                    dst[(y * out_w + x) * 3 + c] = clip8(acc);
                }
            }
        }
        dst
    } else {
        img.as_raw().clone()
    };
    let vertical = if in_h != out_h {
        let t = taps(in_h, out_h);
        let mut dst = vec![0u8; out_w * out_h * 3];
        let stride = out_w * 3;
        for y in 0..out_h {
            for xc in 0..stride {
                let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                for (k, w) in t.weights[y].iter().enumerate() {
                    acc += i32::from(horizontal[(t.start[y] + k) * stride + xc]) * w;
                }
                dst[y * stride + xc] = clip8(acc);
            }
        }
        dst
    } else {
        horizontal
    };
    RgbImage::from_raw(out_w as u32, out_h as u32, vertical)
        .expect("buffer size matches dimensions")
}
