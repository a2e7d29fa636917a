//! The little floating-point maths the Zipf generator needs (`core` has no `ln`,
//! `exp` or `powf` without libm): accurate to ~1e-12 relative, plenty for sampling.

fn ln(x: f64) -> f64 {
    // x = m * 2^e, m in [1, 2); ln m = 2 atanh((m - 1) / (m + 1)).
    let bits = x.to_bits();
    let e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let mut term = t;
    let mut sum = 0.0;
    let mut k = 1.0;
    while k < 40.0 {
        sum += term / k;
        term *= t2;
        k += 2.0;
    }
    2.0 * sum + e as f64 * core::f64::consts::LN_2
}

fn exp(x: f64) -> f64 {
    // x = k ln2 + r, |r| <= ln2 / 2; exp(r) by its series; scale by 2^k.
    let k = (x / core::f64::consts::LN_2 + if x < 0.0 { -0.5 } else { 0.5 }) as i64;
    let r = x - k as f64 * core::f64::consts::LN_2;
    let (mut term, mut sum) = (1.0, 1.0);
    for i in 1..20 {
        term *= r / i as f64;
        sum += term;
    }
    let k = k.clamp(-1022, 1023);
    sum * f64::from_bits(((k + 1023) as u64) << 52)
}

fn pow(a: f64, b: f64) -> f64 {
    exp(b * ln(a))
}

/// Zipf-distributed ranks in 1..=n with exponent theta (Gray et al., "Quickly
/// generating billion-record synthetic databases", SIGMOD'94).
pub struct Zipf {
    n: f64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipf {
    pub fn new(n: u64, theta: f64) -> Self {
        let theta = theta.clamp(0.01, 0.999);
        let zeta = |n: u64| (1..=n).map(|i| 1.0 / pow(i as f64, theta)).sum::<f64>();
        let zetan = zeta(n);
        let zeta2 = zeta(2);
        let nf = n as f64;
        Zipf {
            n: nf,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta: (1.0 - pow(2.0 / nf, 1.0 - theta)) / (1.0 - zeta2 / zetan),
        }
    }

    /// A rank for the uniform sample `u` in [0, 1).
    pub fn sample(&self, u: f64) -> u64 {
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 1;
        }
        if uz < 1.0 + pow(0.5, self.theta) {
            return 2;
        }
        let r = 1.0 + self.n * pow(self.eta * u - self.eta + 1.0, self.alpha);
        (r as u64).clamp(1, self.n as u64)
    }
}
