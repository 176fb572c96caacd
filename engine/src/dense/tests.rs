use super::*;
use crate::quant::tests::random;

/// Every level this build has that this CPU runs (the skipped ones printed).
fn levels() -> Vec<Simd> {
    for s in Simd::ALL.iter().filter(|s| !s.available()) {
        println!("dense: {s:?} skipped, not on this CPU");
    }
    Simd::ALL
        .iter()
        .copied()
        .filter(|s| s.available())
        .collect()
}

fn weights(n: usize, k: usize, bf: bool) -> Tensor {
    let w = Tensor::from_vec(random(n * k, 1), (n, k), &Device::Cpu).unwrap();
    if bf {
        w.to_dtype(DType::BF16).unwrap()
    } else {
        w
    }
}

/// `rows_times` at one level.
fn product(simd: Simd, w: &Tensor, xs: &[f32], m: usize) -> Vec<f32> {
    let p = PackedDense::new(w).unwrap().unwrap();
    match &p.values {
        Values::F32(v) => p.rows_times(simd, v, xs, m),
        Values::Bf16(v) => p.rows_times(simd, v, xs, m),
    }
}

/// Against candle's matmul (an independent implementation), at every level this CPU has,
/// f32 and bf16 weights, odd shapes (a partial last tile, columns past the last group) and
/// batch sizes from one row to more than a block of activation rows, rows long enough to be
/// taken in slices (f32 past 1024 columns, bf16 past 2048); sums in another order differ by
/// rounding only (|x|, |w| < 1: f32 sums of k products differ by well under 1e-4 per 600
/// columns).
#[test]
fn matches_candle_matmul() {
    for simd in levels() {
        for (n, k) in [
            (7, 33),
            (64, 96),
            (130, 257),
            (9, 576),
            (1, 8),
            (3, 5),
            (6, 2061),
        ] {
            let tol = 1e-4 * (k as f32 / 600.0).max(1.0);
            for bf in [false, true] {
                let w = weights(n, k, bf);
                let wf = w.to_dtype(DType::F32).unwrap();
                for m in [1, 2, 3, 8, 17, 40] {
                    let xs = random(m * k, m as u64);
                    let got = product(simd, &w, &xs, m);
                    let x = Tensor::from_vec(xs, (m, k), &Device::Cpu).unwrap();
                    let want = x.matmul(&wf.t().unwrap()).unwrap();
                    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(got.len(), want.len());
                    for (g, r) in got.iter().zip(&want) {
                        assert!(
                            g.is_finite() && r.is_finite() && (g - r).abs() <= tol,
                            "{simd:?} bf16={bf} {n}x{k} m={m}: {g} vs {r}"
                        );
                    }
                }
            }
        }
    }
}

/// The public entry point: bf16 activations give the f32 result on the same (widened) values
/// rounded as candle rounds, for contiguous and strided inputs alike; a wrong width is an
/// error; other dtypes and devices are not packed.
#[test]
fn matmul_t_keeps_the_activations_dtype() {
    let w = PackedDense::new(&weights(5, 40, true)).unwrap().unwrap();
    assert_eq!(
        (w.dims(), w.dtype(), w.bytes()),
        ((5, 40), DType::BF16, 8 * 40 * 2)
    );
    let x = Tensor::from_vec(random(2 * 40, 3), (2, 40), &Device::Cpu).unwrap();
    let xb = x.to_dtype(DType::BF16).unwrap();
    let wide = w.matmul_t(&xb.to_dtype(DType::F32).unwrap()).unwrap();
    let want = wide.to_dtype(DType::BF16).unwrap();
    let strided = Tensor::cat(&[&xb, &xb], 1)
        .unwrap()
        .narrow(1, 40, 40)
        .unwrap();
    let bits = |t: &Tensor| {
        let v = t.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
        v.iter().map(|h| h.to_bits()).collect::<Vec<_>>()
    };
    for x in [&xb, &strided] {
        let y = w.matmul_t(x).unwrap();
        assert_eq!((y.dims2().unwrap(), y.dtype()), ((2, 5), DType::BF16));
        assert_eq!(bits(&y), bits(&want));
    }
    let narrow = Tensor::zeros((1, 39), DType::F32, &Device::Cpu).unwrap();
    assert!(w.matmul_t(&narrow).is_err());
    let f16 = weights(4, 8, false).to_dtype(DType::F16).unwrap();
    assert!(PackedDense::new(&f16).unwrap().is_none());
}

/// A result does not depend on the batch it was computed in: the same bits for an activation
/// row alone or among others (at any place in a step of rows, or the odd one, in a batch that takes
/// larger chunks), and for a weight row in any position of a tile, a whole tile or the padded
/// last one.
#[test]
fn rows_do_not_depend_on_their_tile_or_batch() {
    // 37 columns: one slice; 2061: three slices of f32, two of bf16.
    for (simd, k) in levels().into_iter().flat_map(|s| [(s, 37), (s, 2061)]) {
        let (n, m) = (7, 19);
        for bf in [false, true] {
            let w = weights(n, k, bf);
            let xs = random(m * k, 9);
            let all = product(simd, &w, &xs, m);
            for a in 0..m {
                let alone = product(simd, &w, &xs[a * k..(a + 1) * k], 1);
                for r in 0..n {
                    assert_eq!(
                        alone[r].to_bits(),
                        all[a * n + r].to_bits(),
                        "{simd:?} bf16={bf} k={k}: activation row {a}, weight row {r}"
                    );
                }
            }
            // Rows 4..7 make the padded last tile; here they lead, in a whole one.
            let order = [4u32, 5, 6, 0, 1, 2, 3];
            let idx = Tensor::new(&order, &Device::Cpu).unwrap();
            let moved = product(simd, &w.index_select(&idx, 0).unwrap(), &xs, m);
            for a in 0..m {
                for (i, &r) in order.iter().enumerate() {
                    assert_eq!(
                        moved[a * n + i].to_bits(),
                        all[a * n + r as usize].to_bits(),
                        "{simd:?} bf16={bf} k={k}: weight row {r} at position {i}"
                    );
                }
            }
        }
    }
}

/// The packed layout holds the matrix: every row read back equals the original's, bit for
/// bit (odd shapes: partial last tile, columns past the last group); an id past the table is
/// an error, not a panic.
#[test]
fn rows_read_back_the_matrix() {
    for (n, k) in [(7, 33), (4, 8), (9, 5), (130, 257)] {
        for bf in [false, true] {
            let w = weights(n, k, bf);
            let p = PackedDense::new(&w).unwrap().unwrap();
            let ids: Vec<u32> = (0..n as u32).rev().chain([0, 0]).collect();
            let got = p.rows(&ids).unwrap();
            let want = w.index_select(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap(), 0);
            let f = |t: &Tensor| {
                let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                let v = v.to_vec1::<f32>().unwrap();
                v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(got.dtype(), w.dtype());
            assert_eq!(f(&got), f(&want.unwrap()), "{n}x{k} bf16={bf}");
            assert!(p.rows(&[n as u32]).is_err());
        }
    }
}
