//! Tunnel address allocations as text, one `name address` per line: the format of the file
//! store and of the ConfigMap several redirector replicas share.
use std::{collections::BTreeMap, net::IpAddr};

/// Node name -> its tunnel address.
pub type Allocations = BTreeMap<String, IpAddr>;

pub fn render(a: &Allocations) -> String {
    let mut out = String::with_capacity(a.len() * 32);
    for (name, ip) in a {
        out.push_str(name);
        out.push(' ');
        out.push_str(&ip.to_string());
        out.push('\n');
    }
    out
}

/// The inverse of [`render`]; `what` names the source in errors, which name the line too.
pub fn parse(text: &str, what: &str) -> Result<Allocations, String> {
    let mut a = Allocations::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(name), Some(ip), None) = (f.next(), f.next(), f.next()) else {
            return Err(format!(
                "{what}:{}: expected `<node-name> <address>`, got {line:?}",
                i + 1
            ));
        };
        let ip = ip
            .parse()
            .map_err(|_| format!("{what}:{}: {ip:?} is not an address", i + 1))?;
        a.insert(name.to_owned(), ip);
    }
    Ok(a)
}
