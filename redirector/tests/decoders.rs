//! Property tests of the redirector's text decoders (node table, hosts block, allocation
//! store, address pool): arbitrary input never panics and a failure names the line; what the
//! programs write, they read back unchanged; a managed block never costs the operator a line.
use std::{net::IpAddr, path::Path};

use proptest::prelude::*;
use redirector::{
    hosts,
    node_table::NodeTable,
    nodes::{pool::Pool, store},
};

/// Kubernetes node names (DNS subdomains), short enough to collide now and then.
fn node_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,6}[a-z0-9]"
}

/// Node addresses from the documentation ranges (never loopback, never unspecified).
fn node_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u8..4, 1u8..255).prop_map(|(net, host)| {
            let nets = [[192, 0, 2], [198, 51, 100], [203, 0, 113], [198, 51, 100]];
            let n = nets[net as usize];
            IpAddr::from([n[0], n[1], n[2], host])
        }),
        (1u16..0x200).prop_map(|h| IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, h])),
    ]
}

/// Tokens a hand-edited node table is made of, good and bad.
fn table_token() -> impl Strategy<Value = String> {
    prop_oneof![
        node_name(),
        node_addr().prop_map(|a| a.to_string()),
        node_addr().prop_map(|a| format!("tunnel={a}")),
        Just("#".to_owned()),
        Just("tunnel=".to_owned()),
        Just("127.0.0.1".to_owned()),
        Just("::ffff:198.51.100.7".to_owned()),
        Just("0.0.0.0".to_owned()),
        "[ -~]{0,12}",
        "\\PC{0,6}",
    ]
}

fn table_text() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::collection::vec(table_token(), 0..6), 0..12).prop_map(|lines| {
        lines
            .into_iter()
            .map(|l| l.join(" "))
            .collect::<Vec<_>>()
            .join("\n")
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn node_table_parse_never_panics_and_errors_name_the_line(text in table_text()) {
        let lines = text.lines().count();
        match NodeTable::parse(&text, Path::new("nodes.txt")) {
            Ok(t) => {
                // What it accepted, it writes and reads back to the same table.
                let again = NodeTable::parse(&t.render(), Path::new("rendered")).unwrap();
                prop_assert_eq!(&again.render(), &t.render());
                prop_assert_eq!(&again.tunnel, &t.tunnel);
                for (id, addrs) in &t.nodes {
                    let mut a = addrs.clone();
                    let mut b = again.nodes[id].clone();
                    a.sort();
                    b.sort();
                    prop_assert_eq!(a, b);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let named = (1..=lines.max(1)).any(|l| msg.contains(&format!("nodes.txt:{l}")));
                prop_assert!(named, "error does not name a line: {}", msg);
            }
        }
    }

    #[test]
    fn a_valid_node_table_round_trips(
        nodes in prop::collection::btree_map(
            node_name(),
            (prop::collection::vec(node_addr(), 1..4), any::<bool>()),
            0..20,
        )
    ) {
        // Tunnel addresses drawn from their own range so that none is shared.
        let mut text = String::new();
        for (i, (id, (addrs, with_tunnel))) in nodes.iter().enumerate() {
            let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            text.push_str(&format!("{id} {}", list.join(" ")));
            if *with_tunnel {
                text.push_str(&format!(" tunnel=100.64.0.{}", i + 1));
            }
            text.push('\n');
        }
        let t = NodeTable::parse(&text, Path::new("t")).unwrap();
        prop_assert_eq!(t.nodes.len(), nodes.len());
        let back = NodeTable::parse(&t.render(), Path::new("r")).unwrap();
        prop_assert_eq!(&back.tunnel, &t.tunnel);
        prop_assert_eq!(back.render(), t.render());
    }

    #[test]
    fn the_hosts_block_never_costs_the_operator_a_line(
        before in prop::collection::vec(host_line(), 0..8),
        after in prop::collection::vec(host_line(), 0..8),
        old in prop::collection::vec(host_line(), 0..4),
        terminated in any::<bool>(),
        entries in prop::collection::btree_map(node_name(), node_addr(), 0..5),
    ) {
        let mut existing: Vec<String> = before.clone();
        existing.push(hosts::BEGIN.to_owned());
        existing.extend(old.iter().cloned());
        if terminated {
            existing.push(hosts::END.to_owned());
        }
        existing.extend(after.iter().cloned());
        let existing = existing.join("\n") + "\n";
        let table = NodeTable {
            nodes: entries.iter().map(|(n, a)| (n.clone(), vec![*a])).collect(),
            tunnel: entries.clone(),
        };
        let block = hosts::render(&table);
        let out = hosts::splice(&existing, &block);
        let kept: Vec<&str> = out.lines().collect();
        // Every line of the operator's outside the block survives, in order.
        let mut it = kept.iter();
        for l in before.iter().chain(after.iter()) {
            prop_assert!(it.any(|k| k == l), "lost {:?} from:\n{}\nto:\n{}", l, existing, out);
        }
        // One block, and splicing again changes nothing.
        prop_assert_eq!(out.lines().filter(|l| *l == hosts::BEGIN).count(), usize::from(!block.is_empty()));
        prop_assert_eq!(hosts::splice(&out, &block), out.clone());
        // Removing the block leaves none of its lines but the operator's own.
        let removed = hosts::splice(&out, "");
        prop_assert!(!removed.contains(hosts::BEGIN));
        let theirs: Vec<&String> = before.iter().chain(&after).chain(&old).collect();
        for l in block.lines().filter(|l| !theirs.iter().any(|t| t == l)) {
            prop_assert!(!removed.lines().any(|r| r == l), "{:?} left behind:\n{}", l, removed);
        }
    }

    #[test]
    fn allocations_round_trip_and_bad_lines_are_named(
        a in prop::collection::btree_map(node_name(), node_addr(), 0..30),
        junk in "[ -~]{1,20}",
    ) {
        let text = store::render(&a);
        prop_assert_eq!(store::parse(&text, "store").unwrap(), a);
        let bad = format!("{text}{junk}\n");
        match store::parse(&bad, "store") {
            Ok(parsed) => prop_assert!(parsed.len() >= text.lines().count()),
            Err(e) => prop_assert!(e.to_string().starts_with(&format!("store:{}:", text.lines().count() + 1)), "{}", e),
        }
    }

    #[test]
    fn pool_parse_never_panics(s in "\\PC{0,24}", ip in node_addr(), len in 0u8..130) {
        let _ = Pool::parse(&s);
        if let Ok(p) = Pool::parse(&format!("{ip}/{len}")) {
            prop_assert!(p.size() > 0);
        }
    }
}

/// A line an operator may have in a hosts file (never one of our markers).
fn host_line() -> impl Strategy<Value = String> {
    prop_oneof![
        (node_addr(), node_name()).prop_map(|(a, n)| format!("{a}\t{n}")),
        Just("# a comment".to_owned()),
        Just(String::new()),
        "[ -~]{0,30}".prop_filter("not a marker", |l| l != hosts::BEGIN && l != hosts::END),
    ]
}

mod nodes_from_the_api {
    use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus};
    use proptest::prelude::*;
    use redirector::{
        node_table::NodeTable,
        nodes::{model, pool, store},
    };

    fn node(name: String, addrs: Vec<(String, String)>) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name);
        n.status = Some(NodeStatus {
            addresses: Some(
                addrs
                    .into_iter()
                    .map(|(type_, address)| NodeAddress { type_, address })
                    .collect(),
            ),
            ..Default::default()
        });
        n
    }

    fn addr_type() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("InternalIP".to_owned()),
            Just("ExternalIP".to_owned()),
            Just("Hostname".to_owned()),
            "[A-Za-z]{0,10}",
        ]
    }

    fn address() -> impl Strategy<Value = String> {
        prop_oneof![
            super::node_addr().prop_map(|a| a.to_string()),
            Just("127.0.0.1".to_owned()),
            Just("::".to_owned()),
            "\\PC{0,20}",
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            super::node_name(),
            "\\PC{0,16}",
            "[a-z]{1,4}[ #\\n\\t=][a-z]{1,4}"
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever Nodes the API returns, the table, allocation store and hosts block written
        /// from them read back: one odd Node never garbles the files every node depends on.
        #[test]
        fn whatever_the_api_says_the_written_files_read_back(
            nodes in prop::collection::vec(
                (name(), prop::collection::vec((addr_type(), address()), 0..4)),
                0..6,
            )
        ) {
            let entries: Vec<model::EdgeNode> = nodes
                .into_iter()
                .filter_map(|(n, a)| model::edge_node(&node(n, a)))
                .collect();
            let alloc: pool::Allocations = entries
                .iter()
                .enumerate()
                .map(|(i, e)| (e.name.clone(), format!("100.64.0.{}", i + 1).parse().unwrap()))
                .collect();
            let table = model::table(&entries, &alloc);
            let text = table.render();
            let back = NodeTable::parse(&text, std::path::Path::new("out"));
            prop_assert!(back.is_ok(), "{:?}\n{}", back, text);
            prop_assert_eq!(back.unwrap().render(), text);
            prop_assert_eq!(store::parse(&store::render(&alloc), "store").unwrap(), alloc);
            for e in &entries {
                let prefix = format!("node {}:", e.name);
                prop_assert!(e.problems.iter().all(|p| p.starts_with(&prefix)), "{:?}", e.problems);
            }
        }
    }
}
