//! XMP sidecars: write a caption into `dc:description` (and optionally
//! `Iptc4xmpCore:AltTextAccessibility`) while keeping every other field, and never
//! replace a description a person wrote. captiond marks its own text with a hash of
//! it (`captiond:DescriptionHash`), so an edited caption counts as a person's.

use quick_xml::NsReader;
use quick_xml::events::{BytesStart, BytesText, Event};
use quick_xml::name::{Namespace, ResolveResult};

/// The Dublin Core namespace.
pub const NS_DC: &str = "http://purl.org/dc/elements/1.1/";
/// The RDF namespace.
pub const NS_RDF: &str = "http://www.w3.org/1999/02/22-rdf-syntax-ns#";
/// IPTC Core (alt text).
pub const NS_IPTC: &str = "http://iptc.org/std/Iptc4xmpCore/1.0/xmlns/";
/// captiond's own namespace (the marker).
pub const NS_CAPTIOND: &str = "https://github.com/captiond/captiond/ns/1.0/";

/// What to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description<'a> {
    /// The caption.
    pub text: &'a str,
    /// Also write it as `Iptc4xmpCore:AltTextAccessibility`.
    pub alt_text: bool,
    /// Replace a description that captiond did not write.
    pub overwrite: bool,
}

/// What [`update`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Write this document.
    Write(String),
    /// The sidecar already says this.
    Unchanged,
    /// A person's description is there; left alone (`--overwrite` replaces it).
    KeptPersonDescription(String),
}

/// Why a sidecar could not be updated.
#[derive(Debug, thiserror::Error)]
pub enum XmpError {
    /// The existing file is not well-formed XML.
    #[error("the sidecar is not well-formed XML: {0}")]
    Malformed(String),
    /// The existing file has no `rdf:Description` to write into.
    #[error("the sidecar has no rdf:Description")]
    NoDescription,
}

/// The marker captiond stores beside its text: a short BLAKE3 of the text.
pub fn marker(text: &str) -> String {
    blake3::hash(text.as_bytes()).to_hex()[..16].to_string()
}

fn escape(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

fn alt(text: &str) -> String {
    format!(
        "<rdf:Alt><rdf:li xml:lang=\"x-default\">{}</rdf:li></rdf:Alt>",
        escape(text)
    )
}

fn our_elements(d: &Description<'_>) -> String {
    let mut s = format!(
        "\n   <dc:description>{}</dc:description>\n   <captiond:DescriptionHash>{}</captiond:DescriptionHash>",
        alt(d.text),
        marker(d.text)
    );
    if d.alt_text {
        s.push_str(&format!(
            "\n   <Iptc4xmpCore:AltTextAccessibility>{}</Iptc4xmpCore:AltTextAccessibility>",
            alt(d.text)
        ));
    }
    s
}

/// A new sidecar holding only the description.
pub fn new_sidecar(d: &Description<'_>) -> String {
    format!(
        concat!(
            "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n",
            "<x:xmpmeta xmlns:x=\"adobe:ns:meta/\" x:xmptk=\"captiond {ver}\">\n",
            " <rdf:RDF xmlns:rdf=\"{rdf}\">\n",
            "  <rdf:Description rdf:about=\"\" xmlns:dc=\"{dc}\" xmlns:captiond=\"{cd}\"{iptc}>{body}\n",
            "  </rdf:Description>\n",
            " </rdf:RDF>\n",
            "</x:xmpmeta>\n",
            "<?xpacket end=\"w\"?>\n"
        ),
        ver = env!("CARGO_PKG_VERSION"),
        rdf = NS_RDF,
        dc = NS_DC,
        cd = NS_CAPTIOND,
        iptc = if d.alt_text {
            format!(" xmlns:Iptc4xmpCore=\"{NS_IPTC}\"")
        } else {
            String::new()
        },
        body = our_elements(d),
    )
}

/// Which of our properties an element is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prop {
    Description,
    Marker,
    AltText,
}

fn prop_of(ns: &ResolveResult<'_>, local: &str) -> Option<Prop> {
    let ResolveResult::Bound(Namespace(uri)) = ns else {
        return None;
    };
    match (*uri, local) {
        (NS_DC, "description") => Some(Prop::Description),
        (NS_CAPTIOND, "DescriptionHash") => Some(Prop::Marker),
        (NS_IPTC, "AltTextAccessibility") => Some(Prop::AltText),
        _ => None,
    }
}

fn is_rdf_description(ns: &ResolveResult<'_>, local: &str) -> bool {
    matches!(ns, ResolveResult::Bound(Namespace(u)) if *u == NS_RDF) && local == "Description"
}

fn entity(name: &str) -> Option<char> {
    Some(match name {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "apos" => '\'',
        "quot" => '"',
        _ => return None,
    })
}

/// Updates an existing sidecar (or makes a new one) so that it holds `d`.
pub fn update(existing: Option<&str>, d: &Description<'_>) -> Result<Outcome, XmpError> {
    let Some(existing) = existing else {
        return Ok(Outcome::Write(new_sidecar(d)));
    };
    let mut reader = NsReader::from_str(existing);
    let mut events: Vec<Event<'static>> = Vec::new();
    // Element ranges (inclusive event indexes) of our properties, and their texts.
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut texts: Vec<(Prop, String)> = Vec::new();
    let mut marker_attr: Option<String> = None;
    let mut first_description: Option<usize> = None;
    let mut open: Option<(Prop, usize, usize, String)> = None; // prop, start idx, depth, text
    let mut depth = 0usize;
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| XmpError::Malformed(e.to_string()))?
            .into_owned();
        let idx = events.len();
        match &ev {
            Event::Eof => break,
            Event::Start(e) | Event::Empty(e) => {
                let (ns, local) = reader.resolver().resolve_element(e.name());
                let is_desc = is_rdf_description(&ns, local.as_ref());
                let prop = prop_of(&ns, local.as_ref());
                if open.is_none() {
                    if is_desc && first_description.is_none() {
                        first_description = Some(idx);
                    }
                    if is_desc {
                        for a in e.attributes().flatten() {
                            let (ans, alocal) = reader.resolver().resolve_attribute(a.key);
                            if prop_of(&ans, alocal.as_ref()) == Some(Prop::Marker) {
                                marker_attr = a
                                    .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                    .ok()
                                    .map(|v| v.into_owned());
                            }
                        }
                    }
                    if let Some(p) = prop {
                        if matches!(ev, Event::Empty(_)) {
                            ranges.push((idx, idx));
                            texts.push((p, String::new()));
                        } else {
                            open = Some((p, idx, depth, String::new()));
                        }
                    }
                }
                if matches!(ev, Event::Start(_)) {
                    depth += 1;
                }
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                if let Some((p, start, d0, text)) = &open
                    && depth == *d0
                {
                    ranges.push((*start, idx));
                    texts.push((*p, text.clone()));
                    open = None;
                }
            }
            Event::Text(t) => {
                if let Some((_, _, _, text)) = &mut open {
                    text.push_str(&t.xml10_content());
                }
            }
            Event::CData(t) => {
                if let Some((_, _, _, text)) = &mut open {
                    text.push_str(&t.xml10_content());
                }
            }
            Event::GeneralRef(r) => {
                if let Some((_, _, _, text)) = &mut open {
                    let c = if r.is_char_ref() {
                        r.resolve_char_ref().ok().flatten()
                    } else {
                        entity(&r.xml10_content())
                    };
                    if let Some(c) = c {
                        text.push(c);
                    }
                }
            }
            _ => {}
        }
        events.push(ev);
    }
    let Some(first) = first_description else {
        return Err(XmpError::NoDescription);
    };
    let current = texts
        .iter()
        .find(|(p, _)| *p == Prop::Description)
        .map(|(_, t)| t.trim().to_string());
    let stored_marker = texts
        .iter()
        .find(|(p, _)| *p == Prop::Marker)
        .map(|(_, t)| t.trim().to_string())
        .or(marker_attr);
    let has_alt = texts.iter().any(|(p, _)| *p == Prop::AltText);
    if let Some(cur) = &current
        && !cur.is_empty()
    {
        let ours = stored_marker.as_deref() == Some(marker(cur).as_str());
        if !ours && !d.overwrite {
            return Ok(Outcome::KeptPersonDescription(cur.clone()));
        }
        if ours && cur == d.text && has_alt == d.alt_text {
            return Ok(Outcome::Unchanged);
        }
    }
    // Drop our old elements (and the whitespace just before each), then insert ours
    // at the start of the first rdf:Description.
    let mut skip = vec![false; events.len()];
    for &(a, b) in &ranges {
        for s in skip.iter_mut().take(b + 1).skip(a) {
            *s = true;
        }
        if a > 0
            && let Event::Text(t) = &events[a - 1]
            && t.xml10_content().trim().is_empty()
        {
            skip[a - 1] = true;
        }
    }
    let mut w = quick_xml::Writer::new(Vec::new());
    let io = |e: std::io::Error| XmpError::Malformed(e.to_string());
    for (i, ev) in events.into_iter().enumerate() {
        if skip[i] {
            continue;
        }
        if i == first {
            let (start, empty) = match &ev {
                Event::Start(e) => (e.clone(), false),
                Event::Empty(e) => (e.clone(), true),
                _ => return Err(XmpError::NoDescription),
            };
            let start = with_namespaces(&start, d.alt_text);
            w.write_event(Event::Start(start.borrow())).map_err(io)?;
            w.write_event(Event::Text(BytesText::from_escaped(our_elements(d))))
                .map_err(io)?;
            if empty {
                w.write_event(Event::Text(BytesText::from_escaped("\n  ")))
                    .map_err(io)?;
                w.write_event(Event::End(start.to_end())).map_err(io)?;
            }
            continue;
        }
        w.write_event(ev).map_err(io)?;
    }
    String::from_utf8(w.into_inner())
        .map(Outcome::Write)
        .map_err(|e| XmpError::Malformed(e.to_string()))
}

/// The start tag with our namespace declarations added (where missing) and any
/// marker attribute removed (the marker is written as an element).
fn with_namespaces(start: &BytesStart<'_>, alt_text: bool) -> BytesStart<'static> {
    let name = start.name().as_ref().to_string();
    let mut out = BytesStart::new(name);
    let mut have = Vec::new();
    for a in start.attributes().flatten() {
        let key = a.key.as_ref().to_string();
        if key.ends_with(":DescriptionHash") {
            continue;
        }
        have.push(key);
        out.push_attribute(a);
    }
    let mut add = vec![("xmlns:dc", NS_DC), ("xmlns:captiond", NS_CAPTIOND)];
    if alt_text {
        add.push(("xmlns:Iptc4xmpCore", NS_IPTC));
    }
    for (k, v) in add {
        if !have.iter().any(|h| h == k) {
            out.push_attribute((k, v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(text: &str) -> Description<'_> {
        Description {
            text,
            alt_text: false,
            overwrite: false,
        }
    }

    #[test]
    fn a_second_update_changes_nothing() {
        let Outcome::Write(first) = update(None, &desc("a dog & a cat")).unwrap() else {
            panic!("new sidecar")
        };
        assert!(first.contains("a dog &amp; a cat"));
        assert_eq!(
            update(Some(&first), &desc("a dog & a cat")).unwrap(),
            Outcome::Unchanged
        );
        let Outcome::Write(second) = update(Some(&first), &desc("a bird")).unwrap() else {
            panic!("new text is written")
        };
        let Outcome::Write(third) = update(Some(&second), &desc("a dog & a cat")).unwrap() else {
            panic!("written back")
        };
        assert_eq!(third, first, "rewriting does not drift");
    }

    #[test]
    fn a_person_description_is_kept_unless_overwrite() {
        let person = concat!(
            "<x:xmpmeta xmlns:x=\"adobe:ns:meta/\"><rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">",
            "<rdf:Description rdf:about=\"\" xmlns:d=\"http://purl.org/dc/elements/1.1/\" xmlns:xmp=\"http://ns.adobe.com/xap/1.0/\" xmp:Rating=\"4\">",
            "<d:description><rdf:Alt><rdf:li xml:lang=\"x-default\">Grandma &amp; me</rdf:li></rdf:Alt></d:description>",
            "</rdf:Description></rdf:RDF></x:xmpmeta>"
        );
        assert_eq!(
            update(Some(person), &desc("a caption")).unwrap(),
            Outcome::KeptPersonDescription("Grandma & me".into())
        );
        let mut d = desc("a caption");
        d.overwrite = true;
        let Outcome::Write(out) = update(Some(person), &d).unwrap() else {
            panic!("overwrite writes")
        };
        assert!(out.contains("a caption") && !out.contains("Grandma"));
        assert!(out.contains("xmp:Rating=\"4\""), "other fields stay: {out}");
    }

    #[test]
    fn malformed_sidecars_are_reported() {
        assert!(matches!(
            update(Some("<x:xmpmeta><rdf:RDF>"), &desc("a")),
            Err(XmpError::Malformed(_) | XmpError::NoDescription)
        ));
        assert!(matches!(
            update(Some("<a></b>"), &desc("a")),
            Err(XmpError::Malformed(_))
        ));
    }
}
