//! A hand-edited node table: parsing never panics; a table that parses renders to text that
//! parses to the same table; and the routes the server uses agree with the owners the kernel
//! maps are built from (one owner: that node; more: ambiguous, naming every one).
#![no_main]
use std::path::Path;

use edge_model::{
    node_table::NodeTable,
    routes::{Route, Routes},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(t) = NodeTable::parse(text, Path::new("fuzz")) else {
        return;
    };
    let rendered = t.render();
    let again = NodeTable::parse(&rendered, Path::new("rendered"))
        .unwrap_or_else(|e| panic!("the rendered table does not parse: {e}\n{rendered}"));
    assert_eq!(again.render(), rendered, "render is not stable");
    assert_eq!(again.tunnel, t.tunnel);
    let routes = Routes::from_table(&t);
    let owners = t.owners();
    assert_eq!(routes.len(), owners.len());
    for (ip, who) in &owners {
        match routes.get(ip) {
            Some(Route::Node(n)) => assert!(who.len() == 1 && who.contains(&**n)),
            Some(Route::Ambiguous(ns)) => {
                assert!(who.len() > 1);
                assert_eq!(ns.len(), who.len());
                assert!(ns.iter().all(|n| who.contains(&**n)));
            }
            None => panic!("{ip} has owners {who:?} but no route"),
        }
    }
    let _ = t.kernel_entries();
});
