//! [`Exposition`]: writes metric families in Prometheus' text exposition format 0.0.4
//! (`# HELP`, `# TYPE`, then `name{label="value"} number` lines), escaping label values.

use std::fmt::Write;

/// The text of one scrape, family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

/// The Content-Type of the format written.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Exposition {
    /// A family without labels.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help, &[(Vec::new(), value)]);
    }

    /// A family of samples, each with its labels.
    pub fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: &[(Vec<(&str, &str)>, f64)],
    ) {
        let _ = writeln!(self.text, "# HELP {name} {}", help.replace('\n', " "));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            self.text.push_str(name);
            if !labels.is_empty() {
                let inner: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                let _ = write!(self.text, "{{{}}}", inner.join(","));
            }
            let _ = writeln!(self.text, " {}", number(*value));
        }
    }

    pub fn into_text(self) -> String {
        self.text
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_written_in_the_text_format() {
        let mut e = Exposition::default();
        e.single("a_total", "counter", "As.", 3.0);
        e.family(
            "b",
            "gauge",
            "Bs.",
            &[(vec![("state", "x\"y")], 0.5), (vec![("state", "z")], 1.0)],
        );
        assert_eq!(
            e.into_text(),
            "# HELP a_total As.\n# TYPE a_total counter\na_total 3\n\
             # HELP b Bs.\n# TYPE b gauge\nb{state=\"x\\\"y\"} 0.5\nb{state=\"z\"} 1\n"
        );
    }
}
