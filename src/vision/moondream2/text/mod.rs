//! The text decoder (`text.py`, `rope.py`): parallel blocks with partial rotary
//! embeddings, a bidirectional image prefix and a per-generation KV cache. Single
//! positions (decode steps) go through `host` when the weights are packed on the CPU.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use super::config::TextConfig;
use super::kernels::{KvRows, attend_each, attend_one, prefetch_lines, store_bf16, store_q8};
use super::layers::{Linear, LinearFormat, Mlp, layer_norm, linear};

mod host;

/// Head width; the reference hard-codes the rotary layout around 64.
pub const HEAD_DIM: usize = 64;
/// Dimensions of each head that are rotated.
const ROT_DIM: usize = 32;

/// Keys and values of every layer for the positions fed so far. On the CPU they live
/// in growing host buffers (appended in place, read by the decode kernel); elsewhere
/// as device tensors.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

#[derive(Debug, Clone)]
enum LayerKv {
    Empty,
    /// `[1, kv_heads, len, 64]` device tensors.
    Device(Tensor, Tensor),
    /// Keys and values, per KV head `[len × 64]`.
    Host(HostRows, HostRows),
}

/// How the host KV cache keeps keys and values (`--kv-cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvFormat {
    /// bf16 when the text weights are packed (bf16 or q8), f32 with candle weights.
    #[default]
    Auto,
    /// bf16 rows (2 bytes a value).
    Bf16,
    /// 8-bit rows with one f32 scale per row of 64 (1.06 bytes a value): half the
    /// bytes each decode step reads per sequence.
    Q8,
}

impl std::str::FromStr for KvFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "q8" | "int8" => Ok(Self::Q8),
            other => Err(format!(
                "unknown KV cache format {other:?}; use auto, bf16 or q8"
            )),
        }
    }
}

impl std::fmt::Display for KvFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Bf16 => "bf16",
            Self::Q8 => "q8",
        })
    }
}

/// The storage of host cache rows in effect (a resolved [`KvFormat`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowFormat {
    F32,
    Bf16,
    Q8,
}

/// One layer's keys (or values) on the host: each KV head's rows `[len × 64]` at a
/// stride of `cap` rows in one buffer (not one growing allocation per head), stored as
/// f32, bf16 bits (half the bytes per decode step) or 8-bit values with one scale per
/// row (a quarter). Base pages, not huge ones: the room reserved past `len` stays
/// untouched, so it takes no memory until rows are written there.
#[derive(Debug, Clone)]
struct HostRows {
    heads: usize,
    len: usize,
    cap: usize,
    values: RowValues,
    /// 8-bit rows: one scale per row, at the same stride of `cap`.
    scale: Vec<f32>,
}

/// The values of [`HostRows`], `[heads × cap × 64]`.
#[derive(Debug, Clone)]
enum RowValues {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    Q8(Vec<i8>),
}

impl HostRows {
    fn new(format: RowFormat, heads: usize) -> Self {
        let values = match format {
            RowFormat::F32 => RowValues::F32(Vec::new()),
            RowFormat::Bf16 => RowValues::Bf16(Vec::new()),
            RowFormat::Q8 => RowValues::Q8(Vec::new()),
        };
        Self {
            heads,
            len: 0,
            cap: 0,
            values,
            scale: Vec::new(),
        }
    }

    /// Room for `positions` rows per head in all: the same rows moved to a larger
    /// buffer when they do not fit.
    fn grow_to(&mut self, positions: usize) {
        if positions > self.cap {
            *self = self.relaid(positions);
        }
    }

    /// A copy of the rows with capacity `cap` (at least `len`) per head.
    fn relaid(&self, cap: usize) -> Self {
        fn copy<T: Copy + Default>(
            src: &[T],
            per_row: usize,
            heads: usize,
            (len, old, cap): (usize, usize, usize),
        ) -> Vec<T> {
            // Zeroed from the allocator (fresh pages for a large buffer): the room past
            // each head's rows is not touched here.
            let mut out = vec![T::default(); heads * cap * per_row];
            for h in 0..heads {
                out[h * cap * per_row..(h * cap + len) * per_row]
                    .copy_from_slice(&src[h * old * per_row..(h * old + len) * per_row]);
            }
            out
        }
        let shape = (self.len, self.cap, cap);
        let values = match &self.values {
            RowValues::F32(v) => RowValues::F32(copy(v, HEAD_DIM, self.heads, shape)),
            RowValues::Bf16(v) => RowValues::Bf16(copy(v, HEAD_DIM, self.heads, shape)),
            RowValues::Q8(v) => RowValues::Q8(copy(v, HEAD_DIM, self.heads, shape)),
        };
        let scale = match self.values {
            RowValues::Q8(_) => copy(&self.scale, 1, self.heads, shape),
            _ => Vec::new(),
        };
        Self {
            heads: self.heads,
            len: self.len,
            cap,
            values,
            scale,
        }
    }

    /// Appends rows `[heads × n × 64]` (head-major); 8-bit rows get the scale
    /// `max |x| / 127` and round half to even.
    fn extend(&mut self, data: &[f32]) {
        let n = data.len() / (self.heads * HEAD_DIM).max(1);
        if n == 0 {
            return;
        }
        let need = self.len + n;
        if need > self.cap {
            self.grow_to(need.max(2 * self.cap));
        }
        let (len, cap) = (self.len, self.cap);
        for (h, rows) in data.chunks_exact(n * HEAD_DIM).enumerate() {
            let at = (h * cap + len) * HEAD_DIM..(h * cap + len + n) * HEAD_DIM;
            match &mut self.values {
                RowValues::F32(v) => v[at].copy_from_slice(rows),
                RowValues::Bf16(v) => store_bf16(rows, &mut v[at]),
                RowValues::Q8(v) => {
                    let scale = &mut self.scale[h * cap + len..h * cap + len + n];
                    store_q8(rows, HEAD_DIM, &mut v[at], scale);
                }
            }
        }
        self.len = need;
    }

    /// Starts loading, for writing, the memory the next row's append fills in every
    /// head (see [`prefetch_lines`]).
    fn prefetch_next(&self) {
        if self.len >= self.cap {
            return;
        }
        for h in 0..self.heads {
            let row = h * self.cap + self.len;
            match &self.values {
                RowValues::F32(v) => prefetch_lines(&v[row * HEAD_DIM..(row + 1) * HEAD_DIM]),
                RowValues::Bf16(v) => prefetch_lines(&v[row * HEAD_DIM..(row + 1) * HEAD_DIM]),
                RowValues::Q8(v) => {
                    prefetch_lines(&v[row * HEAD_DIM..(row + 1) * HEAD_DIM]);
                    prefetch_lines(&self.scale[row..row + 1]);
                }
            }
        }
    }

    /// Head `h`'s rows, as the decode kernels read them.
    fn rows(&self, h: usize) -> KvRows<'_> {
        let at = h * self.cap * HEAD_DIM..(h * self.cap + self.len) * HEAD_DIM;
        match &self.values {
            RowValues::F32(v) => KvRows::F32(&v[at]),
            RowValues::Bf16(v) => KvRows::Bf16(&v[at]),
            RowValues::Q8(v) => KvRows::Q8 {
                q: &v[at],
                scale: &self.scale[h * self.cap..h * self.cap + self.len],
            },
        }
    }

    /// Every head's rows.
    fn all_rows(&self) -> Vec<KvRows<'_>> {
        (0..self.heads).map(|h| self.rows(h)).collect()
    }

    /// `[heads × len × 64]` in f32.
    fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.heads * self.len * HEAD_DIM);
        for h in 0..self.heads {
            self.rows(h).extend_f32(&mut out);
        }
        out
    }
}

impl KvCache {
    /// An empty cache for `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::Empty; n_layers],
            len: 0,
        }
    }

    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy that can grow by `extra` positions without reallocating.
    pub fn with_room(&self, extra: usize) -> Self {
        let grow = |rows: &HostRows| rows.relaid(rows.len + extra);
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                LayerKv::Host(k, v) => LayerKv::Host(grow(k), grow(v)),
                other => other.clone(),
            })
            .collect();
        Self {
            layers,
            len: self.len,
        }
    }

    /// Reserves room for `extra` more positions in the host buffers.
    pub fn reserve(&mut self, extra: usize) {
        for layer in &mut self.layers {
            if let LayerKv::Host(k, v) = layer {
                for rows in [k, v] {
                    rows.grow_to(rows.len + extra);
                }
            }
        }
    }

    /// Appends `k`, `v` (`[1, kv_heads, n, 64]`) to a layer; host rows are kept in
    /// `format`.
    fn append(&mut self, layer: usize, k: Tensor, v: Tensor, format: RowFormat) -> Result<()> {
        let slot = &mut self.layers[layer];
        if k.device().is_cpu() && !matches!(slot, LayerKv::Device(..)) {
            self.append_host(
                layer,
                k.dim(1)?,
                &host_values(&k)?,
                &host_values(&v)?,
                format,
            );
            return Ok(());
        }
        let next = match slot {
            LayerKv::Device(pk, pv) => {
                LayerKv::Device(Tensor::cat(&[&*pk, &k], 2)?, Tensor::cat(&[&*pv, &v], 2)?)
            }
            _ => LayerKv::Device(k, v),
        };
        *slot = next;
        Ok(())
    }

    /// Appends host keys and values `[heads × n × 64]` (head-major) to a layer that
    /// lives on the host (created with `heads` KV heads in `format`, if still empty).
    fn append_host(&mut self, layer: usize, heads: usize, k: &[f32], v: &[f32], format: RowFormat) {
        let slot = &mut self.layers[layer];
        if matches!(slot, LayerKv::Empty) {
            *slot = LayerKv::Host(HostRows::new(format, heads), HostRows::new(format, heads));
        }
        if let LayerKv::Host(hk, hv) = slot {
            hk.extend(k);
            hv.extend(v);
        }
    }

    /// Starts loading the memory that the next append to a host `layer` writes: one
    /// new row in each head's keys and values (the host step issues this ahead of the
    /// appends, so that their misses overlap instead of coming one after another).
    fn prefetch_append(&self, layer: usize) {
        if let LayerKv::Host(k, v) = &self.layers[layer] {
            k.prefetch_next();
            v.prefetch_next();
        }
    }

    /// A host layer's keys and values per KV head, as the decode kernels read them.
    fn host_rows(&self, layer: usize) -> Result<(Vec<KvRows<'_>>, Vec<KvRows<'_>>)> {
        let LayerKv::Host(k, v) = &self.layers[layer] else {
            candle_core::bail!("decode attention needs a host cache for layer {layer}");
        };
        Ok((k.all_rows(), v.all_rows()))
    }

    /// The layer's keys and values as `[1, kv_heads, len, 64]` tensors in `dtype`.
    fn tensors(&self, layer: usize, kv_heads: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        match &self.layers[layer] {
            LayerKv::Device(k, v) => Ok((k.clone(), v.clone())),
            LayerKv::Host(k, v) => {
                let t = |rows: &HostRows| -> Result<Tensor> {
                    let data = rows.to_f32();
                    let len = data.len() / (kv_heads * HEAD_DIM);
                    Tensor::from_vec(data, (1, kv_heads, len, HEAD_DIM), &Device::Cpu)?
                        .to_dtype(dtype)
                };
                Ok((t(k)?, t(v)?))
            }
            LayerKv::Empty => candle_core::bail!("KV cache layer {layer} is empty"),
        }
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln: LayerNorm,
    qkv: Linear,
    proj: Linear,
    mlp: Mlp,
    n_heads: usize,
    n_kv_heads: usize,
    /// Storage of this block's host cache rows.
    kv: RowFormat,
    /// The weights as the host decode step reads them (packed formats on the CPU).
    host: Option<host::HostBlock>,
}

/// Text decoder with embeddings and output head.
#[derive(Debug, Clone)]
pub struct TextModel {
    wte: Tensor,
    blocks: Vec<Block>,
    post_ln: LayerNorm,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    /// The rotary table on the host, when every block has its host form: then
    /// single positions are fed by the host decode step.
    host_rope: Option<host::HostRope>,
    /// The output head on the host, when the decode step runs there.
    host_logits: Option<host::HostLogits>,
    cfg: TextConfig,
}

/// Output of feeding positions: the last position's pre-`post_ln` hidden state and,
/// when asked for, its logits.
#[derive(Debug, Clone)]
pub struct Step {
    /// `[dim]` hidden state before the final LayerNorm (what the region heads read).
    pub hidden: Tensor,
    /// `[vocab]` logits of the last position, in f32.
    pub logits: Tensor,
}

impl TextModel {
    /// Loads `text.*` tensors and builds the rotary table; host KV caches are kept in
    /// `kv` (auto: bf16 with packed weights, f32 with candle ones).
    pub fn new(
        cfg: &TextConfig,
        vb: VarBuilder,
        format: LinearFormat,
        kv: KvFormat,
    ) -> Result<Self> {
        let kv = match (kv, format) {
            (KvFormat::Q8, _) => RowFormat::Q8,
            (KvFormat::Bf16, _) => RowFormat::Bf16,
            (KvFormat::Auto, LinearFormat::Candle) => RowFormat::F32,
            (KvFormat::Auto, _) => RowFormat::Bf16,
        };
        let qkv_dim = (cfg.n_heads + 2 * cfg.n_kv_heads) * HEAD_DIM;
        // The largest tensors first, so that their f32 load copies are made while
        // little else is held (peak memory during load).
        let lm_head = linear(cfg.dim, cfg.vocab_size, vb.pp("lm_head"), format)?;
        let wte = match format {
            LinearFormat::Candle => vb.get((cfg.vocab_size, cfg.dim), "wte")?,
            _ => vb.get_with_hints_dtype(
                (cfg.vocab_size, cfg.dim),
                "wte",
                Default::default(),
                DType::BF16,
            )?,
        };
        let on_host = vb.device().is_cpu() && vb.dtype() == DType::F32;
        let blocks = (0..cfg.n_layers)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                let ln = layer_norm(cfg.dim, vb.pp("ln"))?;
                let qkv = linear(cfg.dim, qkv_dim, vb.pp("attn.qkv"), format)?;
                let proj = linear(cfg.dim, cfg.dim, vb.pp("attn.proj"), format)?;
                let mlp = Mlp::new(cfg.dim, cfg.ff_dim, cfg.dim, vb.pp("mlp"), format)?;
                let host = match on_host {
                    true => host::HostBlock::new(&ln, &qkv, &proj, &mlp)?,
                    false => None,
                };
                Ok(Block {
                    ln,
                    qkv,
                    proj,
                    mlp,
                    n_heads: cfg.n_heads,
                    n_kv_heads: cfg.n_kv_heads,
                    kv,
                    host,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (cos, sin) = rotary_values(cfg.max_context);
        let host_rope = blocks
            .iter()
            .all(|b| b.host.is_some())
            .then(|| host::HostRope {
                cos: cos.clone(),
                sin: sin.clone(),
            });
        let post_ln = layer_norm(cfg.dim, vb.pp("post_ln"))?;
        let host_logits = match host_rope {
            Some(_) => host::HostLogits::new(&post_ln, &lm_head)?,
            None => None,
        };
        // The host step needs both.
        let host_rope = host_rope.filter(|_| host_logits.is_some());
        let table = |v: Vec<f32>| {
            Tensor::from_vec(v, (cfg.max_context, ROT_DIM / 2), vb.device())?.to_dtype(vb.dtype())
        };
        Ok(Self {
            wte,
            blocks,
            post_ln,
            lm_head,
            cos: table(cos)?,
            sin: table(sin)?,
            host_rope,
            host_logits,
            cfg: cfg.clone(),
        })
    }

    /// Embeddings of token ids → `[n, dim]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, self.wte.device())?;
        self.wte.embedding(&ids)?.to_dtype(self.cos.dtype())
    }

    /// Feeds `x` (`[n, dim]`) at the cache's next positions. Positions below
    /// `bidirectional_prefix` attend to each other both ways; all others are causal.
    pub fn feed(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        bidirectional_prefix: usize,
    ) -> Result<Step> {
        let n = x.dim(0)?;
        if let (1, Some(rope)) = (n, &self.host_rope) {
            let out = self.step_host(rope, host_values(x)?, &mut [&mut *cache])?;
            cache.len += 1;
            let hidden = Tensor::from_vec(out, self.cfg.dim, &Device::Cpu)?;
            let logits = self.logits(&hidden)?;
            return Ok(Step { hidden, logits });
        }
        let x = self.run_blocks(
            &x.unsqueeze(0)?,
            &mut [cache],
            bidirectional_prefix,
            &mut |_| Ok(()),
        )?;
        let hidden = x.get(0)?.get(n - 1)?;
        let logits = self.logits(&hidden)?;
        Ok(Step { hidden, logits })
    }

    /// Feeds `x` and returns the pre-`post_ln` hidden states of every fed position
    /// after each block (`[n, dim]` per block).
    pub fn feed_all_hidden(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        prefix: usize,
    ) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(self.blocks.len());
        self.run_blocks(&x.unsqueeze(0)?, &mut [cache], prefix, &mut |h| {
            out.push(h.get(0)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Feeds the same number of positions to each of several sequences whose caches
    /// hold equally many positions (e.g. image prefixes into fresh caches): `xs` is
    /// `[batch, n, dim]`, entry `i` going to `caches[i]`. The Linear layers read their
    /// weights once for all `batch × n` rows; each cache ends as [`Self::feed`] of its
    /// entry alone leaves it (the kernels compute every row the same way whatever the
    /// batch). No logits are computed.
    pub fn feed_many(
        &self,
        xs: &Tensor,
        caches: &mut [&mut KvCache],
        bidirectional_prefix: usize,
    ) -> Result<()> {
        let b = xs.dim(0)?;
        if b != caches.len() {
            candle_core::bail!("feed_many: {b} entries for {} caches", caches.len());
        }
        if let Some(c) = caches.iter().find(|c| c.len != caches[0].len) {
            candle_core::bail!(
                "feed_many: caches of {} and {} positions cannot be fed together",
                caches[0].len,
                c.len
            );
        }
        if b > 0 {
            self.run_blocks(xs, caches, bidirectional_prefix, &mut |_| Ok(()))?;
        }
        Ok(())
    }

    /// Runs every block over `x` (`[b, n, dim]`, entry `i` for `caches[i]`, all of the
    /// same length) at the caches' next positions, showing each block's output to
    /// `after_block`; returns the last block's output `[b, n, dim]`.
    fn run_blocks(
        &self,
        x: &Tensor,
        caches: &mut [&mut KvCache],
        prefix: usize,
        after_block: &mut dyn FnMut(&Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let (_, n, _) = x.dims3()?;
        let pos = caches.first().map_or(0, |c| c.len);
        self.check_fits(pos, n)?;
        let at = Positions {
            mask: attention_mask(pos, n, prefix, x.device(), x.dtype())?,
            cos: self.cos.narrow(0, pos, n)?,
            sin: self.sin.narrow(0, pos, n)?,
            host_rope: self.host_rope.as_ref().map(|r| r.span(pos, n)),
        };
        let mut x = x.clone();
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, i, caches, &at)?;
            after_block(&x)?;
        }
        for c in caches.iter_mut() {
            c.len += n;
        }
        Ok(x)
    }

    /// Feeds one token embedding to each of several sequences in one pass: `xs` is
    /// `[batch, dim]`, row `i` going to `caches[i]` at that cache's next position. The
    /// Linear layers read their weights once for the whole batch; attention runs per
    /// sequence over its own cache. Each row's result equals [`Self::feed`] of that row
    /// alone (the kernels compute every row the same way whatever the batch).
    pub fn feed_batch(&self, xs: &Tensor, caches: &mut [&mut KvCache]) -> Result<Vec<Step>> {
        let (b, _) = xs.dims2()?;
        if b != caches.len() {
            candle_core::bail!("feed_batch: {b} rows for {} caches", caches.len());
        }
        if b == 0 {
            return Ok(Vec::new());
        }
        let (hidden, logits) = match (&self.host_rope, &self.host_logits) {
            (Some(rope), Some(head)) => {
                let out = self.step_host(rope, host_values(xs)?, caches)?;
                let logits = head.logits(&out, b);
                let vocab = logits.len() / b;
                (
                    Tensor::from_vec(out, (b, self.cfg.dim), &Device::Cpu)?,
                    Tensor::from_vec(logits, (b, vocab), &Device::Cpu)?,
                )
            }
            _ => {
                let x = self.run_batch_blocks(xs, caches)?;
                let h = self.post_ln.forward(&x)?;
                let logits = self.lm_head.forward(&h)?.get(0)?.to_dtype(DType::F32)?;
                (x.get(0)?, logits)
            }
        };
        for c in caches.iter_mut() {
            c.len += 1;
        }
        (0..b)
            .map(|i| {
                Ok(Step {
                    hidden: hidden.get(i)?,
                    logits: logits.get(i)?,
                })
            })
            .collect()
    }

    /// Fails when a sequence has no room left for one more position.
    fn check_room(&self, caches: &[&mut KvCache]) -> Result<()> {
        caches.iter().try_for_each(|c| self.check_fits(c.len, 1))
    }

    /// Fails when `n` more positions after `len` exceed the model's context.
    fn check_fits(&self, len: usize, n: usize) -> Result<()> {
        if len + n > self.cfg.max_context {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's context of {}",
                len + n,
                self.cfg.max_context
            );
        }
        Ok(())
    }

    /// The blocks of [`Self::feed_batch`] on candle tensors (any device, any weights)
    /// → `[1, b, dim]`; the caches' lengths are not advanced.
    fn run_batch_blocks(&self, xs: &Tensor, caches: &mut [&mut KvCache]) -> Result<Tensor> {
        self.check_room(caches)?;
        let positions: Vec<u32> = caches.iter().map(|c| c.len as u32).collect();
        let positions = Tensor::new(positions.as_slice(), self.cos.device())?;
        // The batch rides the sequence axis: row i is "position" i with its own rotary.
        let at = Positions {
            mask: None,
            cos: self.cos.index_select(&positions, 0)?,
            sin: self.sin.index_select(&positions, 0)?,
            host_rope: None,
        };
        let mut x = xs.unsqueeze(0)?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward_batch(&x, i, caches, &at)?;
        }
        Ok(x)
    }

    /// `lm_head(post_ln(hidden))` in f32 → `[vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        if let Some(head) = &self.host_logits {
            let logits = head.logits(&host_values(hidden)?, 1);
            return Tensor::from_vec(logits, self.cfg.vocab_size, &Device::Cpu);
        }
        let h = self.post_ln.forward(&hidden.unsqueeze(0)?)?;
        self.lm_head.forward(&h)?.get(0)?.to_dtype(DType::F32)
    }

    /// The text configuration.
    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }
}

/// What every block needs about the positions being fed.
struct Positions<'a> {
    /// Additive attention mask, or `None` when everything is visible.
    mask: Option<Tensor>,
    /// Rotary cosines of these positions `[n, 16]`.
    cos: Tensor,
    /// Rotary sines of these positions `[n, 16]`.
    sin: Tensor,
    /// The same cosines and sines on the host, when the blocks run on packed weights
    /// on the CPU (their heads are then split on host rows, `host::split_heads`).
    host_rope: Option<(&'a [f32], &'a [f32])>,
}

impl Block {
    /// `x + attn(ln(x)) + mlp(ln(x))` for `x` `[b, n, dim]`, entry `i` of `caches[i]`.
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        caches: &mut [&mut KvCache],
        at: &Positions,
    ) -> Result<Tensor> {
        let h = self.ln.forward(x)?;
        let attn = self.attention(&h, layer, caches, at)?;
        let mlp = self.mlp.forward(&h)?;
        (x + attn)? + mlp
    }

    /// [`Self::forward`] for one new position of each of several sequences: `x` is
    /// `[1, batch, dim]`, row `i` belonging to `caches[i]`.
    fn forward_batch(
        &self,
        x: &Tensor,
        layer: usize,
        caches: &mut [&mut KvCache],
        at: &Positions,
    ) -> Result<Tensor> {
        let h = self.ln.forward(x)?;
        let (q, k, v) = self.qkv_heads(&h, at)?;
        let attn = if k.device().is_cpu() {
            self.attend_batch_host(&q, &k, &v, layer, caches)?
        } else {
            let mut outs = Vec::with_capacity(caches.len());
            for (i, cache) in caches.iter_mut().enumerate() {
                let row = |t: &Tensor| t.narrow(2, i, 1);
                cache.append(layer, row(&k)?, row(&v)?, self.kv)?;
                outs.push(self.attend_last(&row(&q)?.contiguous()?, layer, cache)?);
            }
            Tensor::cat(&outs, 1)?
        };
        let attn = self.proj.forward(&attn)?;
        let mlp = self.mlp.forward(&h)?;
        (x + attn)? + mlp
    }

    /// The host path of [`Self::forward_batch`]'s attention: `q` `[1, heads, b, 64]`,
    /// `k`/`v` `[1, kv_heads, b, 64]` (row `i` of sequence `i`) are brought to the host
    /// once, appended to each cache, and every (sequence, head) pair attends in one
    /// parallel pass → `[1, b, heads·64]`.
    fn attend_batch_host(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layer: usize,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let b = caches.len();
        // Sequence-major: [b, heads, 64], so that sequence i's rows are contiguous.
        let host = |t: &Tensor| {
            t.transpose(1, 2)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        let (q, k, v) = (host(q)?, host(k)?, host(v)?);
        let kv = k.len() / b;
        for (i, cache) in caches.iter_mut().enumerate() {
            // One position: head-major and sequence-major rows are the same layout.
            let rows = i * kv..(i + 1) * kv;
            cache.append_host(layer, self.n_kv_heads, &k[rows.clone()], &v[rows], self.kv);
        }
        let out = attend_caches(&q, layer, caches)?;
        Tensor::from_vec(out, (1, b, self.n_heads * HEAD_DIM), &Device::Cpu)
    }

    /// Queries (rotated and scaled), keys (rotated) and values of `h` `[b, n, dim]`,
    /// each `[b, heads, n, 64]`.
    fn qkv_heads(&self, h: &Tensor, at: &Positions) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, n, _) = h.dims3()?;
        let qkv = self.qkv.forward(h)?;
        if let Some(rope) = at.host_rope {
            // Packed weights on the CPU: split, rotate and scale in one pass over host
            // rows instead of a strided copy, two rotary ops and a scaling op apiece.
            let [q, k, v] = host::split_heads(
                &host_values(&qkv)?,
                (b, n),
                (self.n_heads, self.n_kv_heads),
                rope,
            );
            let t = |data: Vec<f32>, heads: usize| {
                Tensor::from_vec(data, (b, heads, n, HEAD_DIM), &Device::Cpu)
            };
            return Ok((
                t(q, self.n_heads)?,
                t(k, self.n_kv_heads)?,
                t(v, self.n_kv_heads)?,
            ));
        }
        split_heads_candle(&qkv, (self.n_heads, self.n_kv_heads), &at.cos, &at.sin)
    }

    /// The newest position's query `[1, heads, 1, 64]` over every position of the
    /// layer's cache (which already holds it) → `[1, 1, heads·64]`.
    fn attend_last(&self, q: &Tensor, layer: usize, cache: &KvCache) -> Result<Tensor> {
        if cache.layers[layer].is_host() {
            return self.attend_cached(q, layer, cache);
        }
        let (k, v) = cache.tensors(layer, self.n_kv_heads, q.dtype())?;
        self.attend_candle(q, k, v, None)
    }

    /// Attention with candle's ops: `q` `[b, heads, n, 64]` over `k`/`v`
    /// `[b, kv_heads, m, 64]` with an optional additive mask → `[b, n, heads·64]`.
    fn attend_candle(
        &self,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, _, n, _) = q.dims4()?;
        let rep = self.n_heads / self.n_kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, rep)?;
        let v = candle_transformers::utils::repeat_kv(v, rep)?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, n, self.n_heads * HEAD_DIM))
    }

    /// Attention of `h` `[b, n, dim]` (entry `i` of `caches[i]`, all of one length):
    /// each entry's keys and values are appended to its cache, then its queries attend
    /// over that cache as stored (so rounded as the cache format rounds).
    fn attention(
        &self,
        h: &Tensor,
        layer: usize,
        caches: &mut [&mut KvCache],
        at: &Positions,
    ) -> Result<Tensor> {
        let (b, n, dim) = h.dims3()?;
        let (q, k, v) = self.qkv_heads(h, at)?;
        if let [cache] = caches {
            cache.append(layer, k, v, self.kv)?;
            if n == 1 {
                return self.proj.forward(&self.attend_last(&q, layer, cache)?);
            }
        } else {
            for (i, cache) in caches.iter_mut().enumerate() {
                cache.append(layer, k.narrow(0, i, 1)?, v.narrow(0, i, 1)?, self.kv)?;
            }
        }
        let stored = caches
            .iter()
            .map(|c| c.tensors(layer, self.n_kv_heads, q.dtype()))
            .collect::<Result<Vec<_>>>()?;
        let (k, v): (Vec<Tensor>, Vec<Tensor>) = stored.into_iter().unzip();
        let (k, v) = (Tensor::cat(&k, 0)?, Tensor::cat(&v, 0)?);
        if at.mask.is_none() && self.qkv.is_packed() {
            let out = attend_packed(&q, &k, &v, self.n_heads, self.n_kv_heads)?;
            return self
                .proj
                .forward(&out.transpose(1, 2)?.reshape((b, n, dim))?);
        }
        self.proj
            .forward(&self.attend_candle(&q, k, v, at.mask.as_ref())?)
    }

    /// One query position `[1, heads, 1, 64]` over the host cache of `layer` (which
    /// already holds it) → `[1, 1, heads·64]`.
    fn attend_cached(&self, q: &Tensor, layer: usize, cache: &KvCache) -> Result<Tensor> {
        let (k, v) = cache.host_rows(layer)?;
        let q = host_values(q)?;
        let mut out = vec![0f32; q.len()];
        attend_one(&q, &k, &v, HEAD_DIM, &mut out);
        Tensor::from_vec(out, (1, 1, self.n_heads * HEAD_DIM), &Device::Cpu)
    }
}

impl LayerKv {
    fn is_host(&self) -> bool {
        matches!(self, Self::Host(..))
    }
}

/// Each sequence's new queries (`q` `[b × heads·64]`, row `i` for `caches[i]`) over
/// its host cache of `layer`, which already holds the new position, in one parallel
/// pass → `[b × heads·64]`.
fn attend_caches(q: &[f32], layer: usize, caches: &[&mut KvCache]) -> Result<Vec<f32>> {
    let rows = caches
        .iter()
        .map(|c| c.host_rows(layer))
        .collect::<Result<Vec<_>>>()?;
    let pairs: Vec<(&[KvRows<'_>], &[KvRows<'_>])> =
        rows.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    let mut out = vec![0f32; q.len()];
    attend_each(q, &pairs, HEAD_DIM, &mut out);
    Ok(out)
}

/// Unmasked attention on the bf16 kernels: `q` `[b, heads, n, d]`, `k`/`v`
/// `[b, kv_heads, m, d]` (f32, CPU) → `[b, heads, n, d]`, one batch entry at a time.
pub(super) fn attend_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    let (b, _, n, d) = q.dims4()?;
    let per_entry = (0..b)
        .map(|i| {
            let host =
                |t: &Tensor| -> Result<Vec<f32>> { t.get(i)?.flatten_all()?.to_vec1::<f32>() };
            let qh = host(q)?;
            let mut out = vec![0f32; qh.len()];
            super::kernels::attend_all(&qh, &host(k)?, &host(v)?, heads, kv_heads, d, &mut out);
            Tensor::from_vec(out, (1, heads, n, d), q.device())
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&per_entry, 0)
}

/// The qkv product `[b, n, (heads + 2·kv_heads)·64]` split into queries (rotated, then
/// scaled by 1/8), keys (rotated) and values, each `[b, heads, n, 64]`, with candle ops.
fn split_heads_candle(
    qkv: &Tensor,
    (n_heads, n_kv_heads): (usize, usize),
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, n, _) = qkv.dims3()?;
    let q_w = n_heads * HEAD_DIM;
    let kv_w = n_kv_heads * HEAD_DIM;
    let heads = |start: usize, width: usize, count: usize| -> Result<Tensor> {
        qkv.narrow(D::Minus1, start, width)?
            .reshape((b, n, count, HEAD_DIM))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = (partial_rope(&heads(0, q_w, n_heads)?, cos, sin)? * (1.0 / (HEAD_DIM as f64).sqrt()))?;
    let k = partial_rope(&heads(q_w, kv_w, n_kv_heads)?, cos, sin)?;
    let v = heads(q_w + kv_w, kv_w, n_kv_heads)?;
    Ok((q, k, v))
}

/// Half-split rotary embedding on the first 32 dims of each head; the rest pass through.
fn partial_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let rot = x.narrow(D::Minus1, 0, ROT_DIM)?.contiguous()?;
    let pass = x.narrow(D::Minus1, ROT_DIM, HEAD_DIM - ROT_DIM)?;
    let rot = candle_nn::rotary_emb::rope(&rot, cos, sin)?;
    Tensor::cat(&[&rot, &pass], D::Minus1)
}

/// Every value of `x` (any shape, any float dtype), flattened, as host f32.
fn host_values(x: &Tensor) -> Result<Vec<f32>> {
    x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// cos/sin of `p * 10000^(-2j/32)` for `j < 16`, computed in f32 like the reference,
/// `[max_context × 16]` each.
fn rotary_values(max_context: usize) -> (Vec<f32>, Vec<f32>) {
    let half = ROT_DIM / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|j| 1.0 / 10000f32.powf((2 * j) as f32 / ROT_DIM as f32))
        .collect();
    let mut cos = Vec::with_capacity(max_context * half);
    let mut sin = Vec::with_capacity(max_context * half);
    for p in 0..max_context {
        for f in &freqs {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

/// Additive mask `[n, pos+n]` for queries at `pos..pos+n`, or `None` when every key is
/// visible to every query.
fn attention_mask(
    pos: usize,
    n: usize,
    prefix: usize,
    device: &Device,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let total = pos + n;
    let visible = |i: usize, j: usize| j <= i || (i < prefix && j < prefix);
    // A single query sees every earlier key; several see everything only inside the prefix.
    if n == 1 || total <= prefix {
        return Ok(None);
    }
    let mut m = Vec::with_capacity(n * total);
    for i in pos..total {
        m.extend((0..total).map(|j| {
            if visible(i, j) {
                0f32
            } else {
                f32::NEG_INFINITY
            }
        }));
    }
    Ok(Some(
        Tensor::from_vec(m, (n, total), device)?.to_dtype(dtype)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::{HEAD_DIM, HostRows, RowFormat};

    /// Rows appended in pieces, through growth and copies with room, read back per head
    /// exactly as they were stored (8-bit: as quantised, bf16: as rounded).
    #[test]
    fn host_rows_keep_each_head_through_growth_and_copies() {
        let heads = 32;
        let value =
            |h: usize, pos: usize, d: usize| ((h * 131 + pos * 7 + d) % 97) as f32 / 9.0 - 5.0;
        // Positions [from, to) of every head, head-major as the cache takes them.
        let piece = |from: usize, to: usize| -> Vec<f32> {
            (0..heads)
                .flat_map(|h| {
                    (from..to).flat_map(move |p| (0..HEAD_DIM).map(move |d| value(h, p, d)))
                })
                .collect()
        };
        for format in [RowFormat::Q8, RowFormat::Bf16, RowFormat::F32] {
            let mut rows = HostRows::new(format, heads);
            let mut fed = 0;
            for n in [600, 1, 1, 30] {
                rows.extend(&piece(fed, fed + n));
                fed += n;
            }
            assert!(rows.cap >= fed);
            let mut copy = rows.relaid(fed + 256);
            assert_eq!(copy.cap, fed + 256);
            copy.grow_to(fed + 256);
            copy.extend(&piece(fed, fed + 5));
            let mut alone = HostRows::new(format, heads);
            alone.extend(&piece(0, fed + 5));
            for h in 0..heads {
                let got = copy.rows(h).to_f32();
                assert_eq!(got.len(), (fed + 5) * HEAD_DIM);
                assert_eq!(got, alone.rows(h).to_f32(), "{format:?} head {h}");
                assert_eq!(
                    rows.rows(h).to_f32(),
                    got[..fed * HEAD_DIM],
                    "{format:?} head {h}"
                );
            }
            if format == RowFormat::F32 {
                assert_eq!(alone.to_f32(), piece(0, fed + 5));
            }
        }
    }
}
