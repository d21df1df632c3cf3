//! Number formatting and escaping for the exposition formats.

/// Writes `v` as Prometheus expects: integers without a fraction, `+Inf`,
/// `-Inf`, `NaN`, anything else in the shortest round-tripping form.
#[inline]
pub fn write_f64(buf: &mut Vec<u8>, v: f64) {
    if v.is_nan() {
        buf.extend_from_slice(b"NaN");
    } else if v.is_infinite() {
        buf.extend_from_slice(if v > 0.0 { b"+Inf" } else { b"-Inf" });
    } else if v.abs() < 1e15 && (v as i64) as f64 == v {
        // an integer (the cast round trip: no call to a software trunc)
        let mut b = itoa::Buffer::new();
        buf.extend_from_slice(b.format(v as i64).as_bytes());
    } else {
        let mut b = ryu::Buffer::new();
        buf.extend_from_slice(b.format_finite(v).as_bytes());
    }
}

/// Escapes a label value: `\` `"` and newline.
#[inline]
pub fn escape_label_value(buf: &mut Vec<u8>, v: &[u8]) {
    if !v.iter().any(|&c| c == b'\\' || c == b'"' || c == b'\n') {
        buf.extend_from_slice(v);
        return;
    }
    for &c in v {
        match c {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'"' => buf.extend_from_slice(b"\\\""),
            b'\n' => buf.extend_from_slice(b"\\n"),
            _ => buf.push(c),
        }
    }
}

/// Escapes HELP text: `\` and newline (and `"` for OpenMetrics).
pub fn escape_help(buf: &mut Vec<u8>, v: &[u8], quote: bool) {
    for &c in v {
        match c {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'"' if quote => buf.extend_from_slice(b"\\\""),
            _ => buf.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(v: f64) -> String {
        let mut b = Vec::new();
        write_f64(&mut b, v);
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn numbers() {
        assert_eq!(f(0.0), "0");
        assert_eq!(f(-0.0), "0");
        assert_eq!(f(42.0), "42");
        assert_eq!(f(-3.0), "-3");
        assert_eq!(f(0.005), "0.005");
        assert_eq!(f(2.5), "2.5");
        assert_eq!(f(1e20), "1e20");
        assert_eq!(f(f64::INFINITY), "+Inf");
        assert_eq!(f(f64::NEG_INFINITY), "-Inf");
        assert_eq!(f(f64::NAN), "NaN");
        assert_eq!(f(123456789012.0), "123456789012");
        assert_eq!(f(999999999999999.0), "999999999999999");
        assert_eq!(f(1e15), "1000000000000000.0");
        assert_eq!(f(-2.5), "-2.5");
        assert_eq!(f(0.1 + 0.2), "0.30000000000000004");
    }

    #[test]
    fn escaping() {
        let mut b = Vec::new();
        escape_label_value(&mut b, b"a\\b\"c\nd");
        assert_eq!(b, b"a\\\\b\\\"c\\nd");
        let mut h = Vec::new();
        escape_help(&mut h, b"x\\y\n\"z\"", false);
        assert_eq!(h, b"x\\\\y\\n\"z\"");
        h.clear();
        escape_help(&mut h, b"\"", true);
        assert_eq!(h, b"\\\"");
    }
}
