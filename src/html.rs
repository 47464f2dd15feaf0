//! HTML text shared by the landing page and the offer email.

/// Escapes text for HTML content and double-quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `mailto:` for an email address, the URL itself otherwise (branding allows only these two).
pub fn contact_href(contact: &str) -> String {
    if contact.starts_with("https://") {
        contact.to_owned()
    } else {
        format!("mailto:{contact}")
    }
}
