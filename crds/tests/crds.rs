//! The generated CRDs: names, printer columns, categories, CEL rules, and
//! the validation the API server will apply to manifests.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{Value, json};
use support::validate_object;
use warren_crds::v1alpha1::{Binding, Broker, Exchange, Queue};

fn crd_json(kind: &str) -> Value {
    let crd = warren_crds::crds().into_iter().find(|c| c.spec.names.kind == kind).unwrap();
    serde_json::to_value(crd).unwrap()
}

fn queue(spec: Value) -> Value {
    json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Queue", "metadata": {"name": "orders"}, "spec": spec})
}

fn errors_of(obj: &Value, old: Option<&Value>) -> String {
    validate_object(obj, old).expect_err("expected the object to be rejected").join("\n")
}

#[test]
fn should_define_six_namespaced_kinds_in_the_warren_category() {
    let crds = warren_crds::crds();
    let names: Vec<_> = crds.iter().map(|c| c.metadata.name.clone().unwrap()).collect();
    assert_eq!(
        names,
        [
            "brokers.warren.dev",
            "exchanges.warren.dev",
            "queues.warren.dev",
            "bindings.warren.dev",
            "users.warren.dev",
            "permissions.warren.dev"
        ]
    );
    for crd in &crds {
        assert_eq!(crd.spec.group, "warren.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.categories.as_deref(), Some(&["warren".to_string()][..]));
        assert_eq!(crd.spec.versions.len(), 1);
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.served && v.storage);
        assert!(v.subresources.as_ref().unwrap().status.is_some(), "{} has a status subresource", crd.spec.names.kind);
    }
    let short: Vec<_> = crds.iter().map(|c| c.spec.names.short_names.clone().unwrap()[0].clone()).collect();
    assert_eq!(short, ["wb", "wx", "wq", "wbd", "wu", "wperm"]);
}

#[test]
fn should_show_queue_counts_and_replicas_as_printer_columns() {
    let crd = crd_json("Queue");
    let cols = crd["spec"]["versions"][0]["additionalPrinterColumns"].as_array().unwrap();
    let default_cols: Vec<_> = cols
        .iter()
        .filter(|c| c.get("priority").is_none())
        .map(|c| (c["name"].as_str().unwrap(), c["jsonPath"].as_str().unwrap()))
        .collect();
    assert_eq!(
        default_cols,
        [
            ("Ready", ".status.ready"),
            ("Unacked", ".status.unacked"),
            ("Consumers", ".status.consumers"),
            ("Replicas", ".status.autoscaling.currentReplicas"),
            ("Age", ".metadata.creationTimestamp"),
        ]
    );
    let broker = crd_json("Broker");
    let cols: Vec<_> = broker["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(cols, ["Replicas", "Ready", "Endpoint", "Status", "Age"]);
}

#[test]
fn should_document_every_spec_and_status_field() {
    fn walk(schema: &Value, path: &str, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                let p = format!("{path}.{k}");
                if v.get("description").and_then(Value::as_str).is_none_or(str::is_empty) {
                    missing.push(p.clone());
                }
                walk(v, &p, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(items, &format!("{path}[]"), missing);
        }
    }
    let mut missing = Vec::new();
    for kind in ["Broker", "Exchange", "Queue", "Binding"] {
        let schema = support::schema_for_kind(kind);
        for top in ["spec", "status"] {
            walk(&schema["properties"][top], &format!("{kind}.{top}"), &mut missing);
        }
    }
    assert!(missing.is_empty(), "fields without a description (kubectl explain): {missing:#?}");
}

#[test]
fn should_accept_a_minimal_queue_and_fill_defaults() {
    validate_object(&queue(json!({"brokerRef": {"name": "warren"}})), None).unwrap();
    let q: Queue = serde_json::from_value(queue(json!({"brokerRef": {"name": "warren"}}))).unwrap();
    assert!(q.spec.durable);
    assert_eq!(q.broker_name(), "orders");
}

#[test]
fn should_reject_out_of_range_and_unknown_queue_fields() {
    let e = errors_of(&queue(json!({"brokerRef": {"name": "w"}, "maxPriority": 256})), None);
    assert!(e.contains("spec.maxPriority: must be less than or equal to 255"), "{e}");
    let e = errors_of(&queue(json!({"brokerRef": {"name": "w"}, "overflow": "drop-tail"})), None);
    assert!(e.contains("spec.overflow: unsupported value"), "{e}");
    let e = errors_of(&queue(json!({"brokerRef": {"name": "w"}, "messageTTL": 5})), None);
    assert!(e.contains("unknown field \"messageTTL\""), "{e}");
    let e = errors_of(&queue(json!({"brokerRef": {"name": "w"}, "type": "stream"})), None);
    assert!(e.contains("spec.type: unsupported value"), "{e}");
    let e = errors_of(&queue(json!({"durable": true})), None);
    assert!(e.contains("spec.brokerRef: Required value"), "{e}");
}

#[test]
fn should_reject_inconsistent_queue_arguments_with_cel() {
    let e = errors_of(&queue(json!({"brokerRef": {"name": "w"}, "overflow": "reject-publish"})), None);
    assert!(e.contains("overflow needs maxLength or maxLengthBytes"), "{e}");
    let e = errors_of(&queue(json!({"brokerRef": {"name": "w"}, "deadLetterRoutingKey": "dead"})), None);
    assert!(e.contains("deadLetterRoutingKey needs deadLetterExchange"), "{e}");
    let e = errors_of(&queue(json!({"brokerRef": {"name": "w"}, "arguments": {"x-message-ttl": 5}})), None);
    assert!(e.contains("x-message-ttl has a typed field: set spec.messageTtlMs instead"), "{e}");
    let e = errors_of(&queue(json!({"brokerRef": {"name": "w"}, "arguments": {"x-single-active-consumer": true}})), None);
    assert!(e.contains("set spec.singleActiveConsumer instead"), "{e}");
    let e = errors_of(&queue(json!({"brokerRef": {"name": "w"}, "arguments": {"x-dead-letter-exchange": "dlx"}})), None);
    assert!(e.contains("set spec.deadLetterExchange instead"), "{e}");
    let e = errors_of(&queue(json!({"brokerRef": {"name": "w"}, "name": "bad\u{7}name"})), None);
    assert!(e.contains("spec.name: should match"), "{e}");
    let e = errors_of(&queue(json!({"brokerRef": {"name": "w"}, "name": "amq.private"})), None);
    assert!(e.contains("reserved"), "{e}");
    // Free-form values of any JSON type pass through.
    let any = json!({"x-custom": "yes", "x-n": 5, "x-f": 1.5, "x-b": true, "x-l": [1, "a"], "x-m": {"k": "v"}});
    validate_object(&queue(json!({"brokerRef": {"name": "w"}, "arguments": any})), None).unwrap();
    // A delivery limit of 0 is valid for the broker (dead-letter on the first return).
    validate_object(&queue(json!({"brokerRef": {"name": "w"}, "deliveryLimit": 0})), None).unwrap();
    let e = errors_of(&queue(json!({"brokerRef": {"name": "w"}, "deliveryLimit": 4294967296_i64})), None);
    assert!(e.contains("spec.deliveryLimit: must be less than or equal to"), "{e}");
}

#[test]
fn should_hold_quorum_queues_to_the_brokers_rules() {
    let q = |extra: Value| {
        let mut spec = json!({"brokerRef": {"name": "w"}, "type": "quorum"});
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        queue(spec)
    };
    validate_object(
        &q(json!({"deliveryLimit": 5, "messageTtlMs": 1000, "expiresMs": 60000, "arguments": {"x-quorum-initial-group-size": 5}})),
        None,
    )
    .unwrap();
    for (extra, want) in
        [(json!({"durable": false}), "a quorum queue is durable"), (json!({"autoDelete": true}), "a quorum queue cannot be autoDelete")]
    {
        let e = errors_of(&q(extra.clone()), None);
        assert!(e.contains(want), "{extra}: {e}");
    }
    // Classic queues may.
    validate_object(&queue(json!({"brokerRef": {"name": "w"}, "durable": false, "autoDelete": true, "expiresMs": 1})), None).unwrap();
    let e = errors_of(&q(json!({})), Some(&queue(json!({"brokerRef": {"name": "w"}}))));
    assert!(e.contains("type is immutable"), "{e}");
    let parsed: Queue = serde_json::from_value(q(json!({}))).unwrap();
    assert_eq!(parsed.spec.type_.as_str(), "quorum");
}

/// The API server builds a CEL type from the schema and drops every field
/// whose values have no type (free-form `arguments`): a rule naming such a
/// field does not compile, and the API server refuses the whole CRD. This
/// walks every rule of every CRD and checks each `self.x` / `oldSelf.x` it
/// names against what CEL can see at that node.
#[test]
fn should_only_reference_fields_cel_can_see() {
    let field = regex::Regex::new(r"(?:\bself|\boldSelf)\.([A-Za-z_][A-Za-z0-9_]*)").unwrap();
    let mut problems = Vec::new();
    let mut rules_seen = 0;
    for kind in ["Broker", "Exchange", "Queue", "Binding"] {
        let mut nodes = Vec::new();
        support::nodes_with_rules(&support::schema_for_kind(kind), kind, &mut nodes);
        for (path, node) in nodes {
            let visible = support::cel_visible_properties(&node);
            for r in node["x-kubernetes-validations"].as_array().unwrap() {
                rules_seen += 1;
                let text = r["rule"].as_str().unwrap();
                for cap in field.captures_iter(text) {
                    let name = &cap[1];
                    // At the root, CEL sees metadata.name and generateName.
                    let root_metadata = path == kind && name == "metadata" && text.contains("self.metadata.name");
                    if !visible.iter().any(|v| v == name) && !root_metadata {
                        problems.push(format!("{path}: rule `{text}` names `{name}`, which CEL cannot see"));
                    }
                }
            }
        }
    }
    assert!(rules_seen > 20, "the walk found the rules ({rules_seen})");
    assert!(problems.is_empty(), "{problems:#?}");
    // The check itself catches the original bug: a map whose values are
    // untyped (any JSON) is invisible, so `self.arguments` cannot compile.
    let old_schema = json!({"type": "object", "properties": {
        "arguments": {"type": "object", "additionalProperties": {"x-kubernetes-preserve-unknown-fields": true}},
        "messageTtlMs": {"type": "integer"},
    }});
    assert_eq!(support::cel_visible_properties(&old_schema), ["messageTtlMs"]);
}

#[test]
fn should_refuse_changing_what_the_broker_cannot_change() {
    let old = queue(json!({"brokerRef": {"name": "w"}, "messageTtlMs": 1000}));
    let changed = queue(json!({"brokerRef": {"name": "w"}, "messageTtlMs": 2000}));
    let e = errors_of(&changed, Some(&old));
    assert!(e.contains("messageTtlMs is immutable: the broker cannot change it in place"), "{e}");

    // Adding or removing an optional argument is a change too.
    let added = queue(json!({"brokerRef": {"name": "w"}, "messageTtlMs": 1000, "maxLength": 10}));
    assert!(errors_of(&added, Some(&old)).contains("maxLength is immutable"));
    let removed = queue(json!({"brokerRef": {"name": "w"}}));
    assert!(errors_of(&removed, Some(&old)).contains("messageTtlMs is immutable"));
    let durable = queue(json!({"brokerRef": {"name": "w"}, "messageTtlMs": 1000, "durable": false}));
    assert!(errors_of(&durable, Some(&old)).contains("durable is immutable"));

    // Arguments are not immutable in the schema (CEL cannot see them): the
    // broker refuses the change and the operator reports it.
    let with_args = |v: i64| queue(json!({"brokerRef": {"name": "w"}, "messageTtlMs": 1000, "arguments": {"x-custom": v}}));
    validate_object(&with_args(2), Some(&with_args(1))).unwrap();

    // Optional fields that the operator applies can be set later.
    let later =
        queue(json!({"brokerRef": {"name": "w"}, "messageTtlMs": 1000, "autoscaling": {"target": {"name": "w"}, "maxReplicas": 2}}));
    validate_object(&later, Some(&old)).unwrap();

    // What the operator can apply stays mutable: deletion policy, autoscaling.
    let mutable = queue(json!({
        "brokerRef": {"name": "w"}, "messageTtlMs": 1000, "deletionPolicy": "Retain",
        "autoscaling": {"target": {"name": "worker"}, "maxReplicas": 5}
    }));
    validate_object(&mutable, Some(&old)).unwrap();
}

#[test]
fn should_validate_autoscaling_bounds() {
    let spec = |a: Value| queue(json!({"brokerRef": {"name": "w"}, "autoscaling": a}));
    validate_object(&spec(json!({"target": {"name": "worker"}, "minReplicas": 0, "maxReplicas": 3})), None).unwrap();
    let e = errors_of(&spec(json!({"target": {"name": "worker"}, "minReplicas": 4, "maxReplicas": 3})), None);
    assert!(e.contains("maxReplicas must be at least minReplicas"), "{e}");
    let e = errors_of(&spec(json!({"target": {"name": "worker"}, "maxReplicas": 3, "pollingSeconds": 0})), None);
    assert!(e.contains("pollingSeconds: must be greater than or equal to 1"), "{e}");
    let e = errors_of(&spec(json!({"target": {"name": "worker"}, "maxReplicas": 3, "backlog": "All"})), None);
    assert!(e.contains("backlog: unsupported value"), "{e}");
    let q: Queue = serde_json::from_value(spec(json!({"target": {"name": "worker"}, "maxReplicas": 3}))).unwrap();
    let a = q.spec.autoscaling.unwrap();
    assert_eq!((a.polling_seconds, a.messages_per_replica, a.target.kind.as_str()), (5, 10, "Deployment"));
}

#[test]
fn should_make_bindings_and_exchanges_immutable_and_brokers_storage_immutable() {
    let binding = |key: &str| {
        json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Binding", "metadata": {"name": "b"},
               "spec": {"brokerRef": {"name": "w"}, "source": "orders", "destination": "q", "routingKey": key}})
    };
    let e = errors_of(&binding("b"), Some(&binding("a")));
    assert!(e.contains("routingKey is immutable"), "{e}");

    let exchange = |t: &str| {
        json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Exchange", "metadata": {"name": "x"},
               "spec": {"brokerRef": {"name": "w"}, "type": t}})
    };
    let e = errors_of(&exchange("fanout"), Some(&exchange("topic")));
    assert!(e.contains("type is immutable"), "{e}");
    let e = errors_of(&exchange("random"), None);
    assert!(e.contains("spec.type: unsupported value"), "{e}");

    let broker = |size: &str, replicas: i64| {
        json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Broker", "metadata": {"name": "w"},
               "spec": {"replicas": replicas, "storage": {"size": size}}})
    };
    validate_object(&broker("10Gi", 1), None).unwrap();
    let e = errors_of(&broker("20Gi", 1), Some(&broker("10Gi", 1)));
    assert!(e.contains("storage is immutable"), "{e}");
    validate_object(&broker("10Gi", 3), None).unwrap();
    validate_object(&broker("10Gi", 7), None).unwrap();
    let e = errors_of(&broker("10Gi", 8), None);
    assert!(e.contains("spec.replicas: must be less than or equal to 7"), "{e}");
    let e = errors_of(&broker("10Gi", 0), None);
    assert!(e.contains("spec.replicas: must be greater than or equal to 1"), "{e}");
    let e = errors_of(&broker("lots", 1), None);
    assert!(e.contains("spec.storage.size: should match"), "{e}");

    // Binding arguments can change: the operator re-binds.
    let with_args = |v: &str| {
        json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Binding", "metadata": {"name": "b"},
               "spec": {"brokerRef": {"name": "w"}, "source": "orders", "destination": "q", "arguments": {"x-match": v}}})
    };
    validate_object(&with_args("any"), Some(&with_args("all"))).unwrap();
    let e = errors_of(
        &json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Exchange", "metadata": {"name": "x"},
                "spec": {"brokerRef": {"name": "w"}, "arguments": {"alternate-exchange": "ae"}}}),
        None,
    );
    assert!(e.contains("set spec.alternateExchange instead"), "{e}");
}

#[test]
fn should_resize_a_cluster_but_never_turn_a_single_broker_into_one() {
    let broker = |replicas: i64| json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Broker", "metadata": {"name": "w"}, "spec": {"replicas": replicas}});
    validate_object(&broker(5), Some(&broker(3))).unwrap();
    validate_object(&broker(3), Some(&broker(5))).unwrap();
    validate_object(&broker(2), Some(&broker(3))).unwrap();
    for (from, to) in [(1, 3), (3, 1)] {
        let e = errors_of(&broker(to), Some(&broker(from)));
        assert!(e.contains("replicas cannot change between 1 and more than 1"), "{from} -> {to}: {e}");
    }
    // The queue type is an enum with a default.
    let b: Broker = serde_json::from_value(broker(3)).unwrap();
    assert_eq!(b.spec.default_queue_type, warren_crds::v1alpha1::DefaultQueueType::Quorum);
    let mut classic = broker(3);
    classic["spec"]["defaultQueueType"] = "classic".into();
    validate_object(&classic, None).unwrap();
    classic["spec"]["defaultQueueType"] = "stream".into();
    let e = errors_of(&classic, None);
    assert!(e.contains("spec.defaultQueueType: unsupported value"), "{e}");
}

#[test]
fn should_refuse_broker_settings_the_broker_would_refuse() {
    let broker = |config: Value| json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Broker", "metadata": {"name": "w"}, "spec": {"config": config}});
    let good = [
        json!({"memoryHighWatermark": "0.4"}),
        json!({"memoryHighWatermark": "1.0"}),
        json!({"memoryHighWatermark": ".5"}),
        json!({"memoryHighWatermark": "2Gi"}),
        json!({"memoryHighWatermark": "1073741824"}),
        json!({"memoryCalculationStrategy": "allocated"}),
        json!({"diskFreeLimit": "1Gi"}),
        json!({"diskFreeLimit": 52428800}),
        json!({"diskFreeLimit": 5368709120_i64}),
        json!({"memoryHighWatermark": "32Mi"}),
        json!({"diskFreeLimit": "500M"}),
        json!({"publishBlockTimeout": "30s"}),
        json!({"publishBlockTimeout": "1h"}),
        json!({"alarmCheckInterval": "250ms"}),
        json!({"alarmCheckInterval": "60s"}),
    ];
    for config in good {
        validate_object(&broker(config.clone()), None).unwrap_or_else(|e| panic!("{config} refused: {e:?}"));
    }
    let bad = [
        (json!({"memoryHighWatermark": "1.5"}), "memoryHighWatermark: should match"),
        (json!({"memoryHighWatermark": "0.0"}), "memoryHighWatermark: should match"),
        (json!({"memoryHighWatermark": "40%"}), "memoryHighWatermark: should match"),
        (json!({"memoryHighWatermark": "2GiB"}), "memoryHighWatermark: should match"),
        (json!({"memoryHighWatermark": 0.4}), "memoryHighWatermark: must be of type string"),
        (json!({"memoryCalculationStrategy": "pss"}), "memoryCalculationStrategy: unsupported value"),
        (json!({"diskFreeLimit": "lots"}), "diskFreeLimit: should match"),
        (json!({"diskFreeLimit": "1.5Gi"}), "diskFreeLimit: should match"),
        (json!({"publishBlockTimeout": "2h"}), "publishBlockTimeout must be at most 1h"),
        (json!({"publishBlockTimeout": "1m30s"}), "publishBlockTimeout: should match"),
        (json!({"alarmCheckInterval": "5ms"}), "alarmCheckInterval must be between 10ms and 60s"),
        (json!({"alarmCheckInterval": "2m"}), "alarmCheckInterval must be between 10ms and 60s"),
        (json!({"diskFreeLimt": "1Gi"}), "unknown field \"diskFreeLimt\""),
        // The broker refuses an absolute watermark below 32 MiB.
        (json!({"memoryHighWatermark": "16Mi"}), "memoryHighWatermark as a quantity must be at least 32Mi"),
        (json!({"memoryHighWatermark": "33554431"}), "memoryHighWatermark as a quantity must be at least 32Mi"),
        (json!({"diskFreeLimit": -1}), "diskFreeLimit"),
    ];
    for (config, want) in bad {
        let e = errors_of(&broker(config.clone()), None);
        assert!(e.contains(want), "{config}: expected {want:?} in {e}");
    }
}

#[test]
fn should_round_trip_every_kind_through_serde() {
    // The generated types deserialize what the schema accepts.
    for (file, doc) in support::warren_documents(&support::repo_root().join("examples")) {
        let kind = doc["kind"].as_str().unwrap();
        let ok = match kind {
            "Broker" => serde_json::from_value::<Broker>(doc.clone()).is_ok(),
            "Exchange" => serde_json::from_value::<Exchange>(doc.clone()).is_ok(),
            "Queue" => serde_json::from_value::<Queue>(doc.clone()).is_ok(),
            "Binding" => serde_json::from_value::<Binding>(doc.clone()).is_ok(),
            "User" => serde_json::from_value::<warren_crds::v1alpha1::User>(doc.clone()).is_ok(),
            "Permission" => serde_json::from_value::<warren_crds::v1alpha1::Permission>(doc.clone()).is_ok(),
            other => panic!("{}: unexpected kind {other}", file.display()),
        };
        assert!(ok, "{}: {kind} does not deserialize", file.display());
    }
}

/// The operator refuses CRDs of an older revision, so the revision must
/// change whenever the schemas do: each revision's schema hash is recorded.
#[test]
fn should_bump_the_schema_revision_when_the_schemas_change() {
    let recorded = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema-revisions.txt")).unwrap();
    let hash = warren_crds::schema_hash();
    let line = recorded.lines().find(|l| l.split_whitespace().next() == Some(&warren_crds::SCHEMA_REVISION.to_string()));
    match line {
        Some(l) => assert_eq!(
            l.split_whitespace().nth(1),
            Some(hash.as_str()),
            "the CRD schemas changed since revision {} was recorded: bump warren_crds::SCHEMA_REVISION and add `{} {hash}` to crds/schema-revisions.txt",
            warren_crds::SCHEMA_REVISION,
            warren_crds::SCHEMA_REVISION + 1
        ),
        None => panic!(
            "crds/schema-revisions.txt has no line for revision {}: add `{} {hash}`",
            warren_crds::SCHEMA_REVISION,
            warren_crds::SCHEMA_REVISION
        ),
    }
    for crd in warren_crds::crds() {
        let annotations = crd.metadata.annotations.unwrap_or_default();
        assert_eq!(annotations.get(warren_crds::SCHEMA_REVISION_ANNOTATION), Some(&warren_crds::SCHEMA_REVISION.to_string()));
    }
}

#[test]
fn should_validate_users_permissions_and_tls() {
    let user = |name: &str| {
        json!({"apiVersion": "warren.dev/v1alpha1", "kind": "User", "metadata": {"name": "u"},
               "spec": {"brokerRef": {"name": "w"}, "name": name, "tags": ["administrator"]}})
    };
    validate_object(&user("alice"), None).unwrap();
    let e = errors_of(&user("bob"), Some(&user("alice")));
    assert!(e.contains("name is immutable"), "{e}");
    let e = errors_of(&user("a:b"), None);
    assert!(e.contains("spec.name: should match"), "{e}");

    let permission =
        |spec: Value| json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Permission", "metadata": {"name": "p"}, "spec": spec});
    let for_user = permission(json!({"brokerRef": {"name": "w"}, "user": "alice", "configure": "^a", "write": ".*", "read": ".*"}));
    validate_object(&for_user, None).unwrap();
    validate_object(&permission(json!({"brokerRef": {"name": "w"}, "serviceAccount": {"name": "worker"}, "read": "^jobs$"})), None)
        .unwrap();
    let e = errors_of(&permission(json!({"brokerRef": {"name": "w"}, "read": ".*"})), None);
    assert!(e.contains("set exactly one of user and serviceAccount"), "{e}");
    let e = errors_of(&permission(json!({"brokerRef": {"name": "w"}, "user": "a", "serviceAccount": {"name": "s"}})), None);
    assert!(e.contains("set exactly one of user and serviceAccount"), "{e}");
    // Beside their Broker only: whoever creates them may create an
    // administrator of the broker.
    let elsewhere = permission(json!({"brokerRef": {"name": "w", "namespace": "platform"}, "user": "alice", "read": ".*"}));
    let e = errors_of(&elsewhere, None);
    assert!(e.contains("live in their Broker's namespace"), "{e}");
    let mut remote_user = user("alice");
    remote_user["spec"]["brokerRef"]["namespace"] = "platform".into();
    let e = errors_of(&remote_user, None);
    assert!(e.contains("live in their Broker's namespace"), "{e}");
    let moved = permission(json!({"brokerRef": {"name": "w"}, "user": "bob", "configure": "^a", "write": ".*", "read": ".*"}));
    let e = errors_of(&moved, Some(&for_user));
    assert!(e.contains("user is immutable"), "{e}");

    let broker =
        |tls: Value| json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Broker", "metadata": {"name": "w"}, "spec": {"tls": tls}});
    validate_object(&broker(json!({"secretName": "w-tls", "clientAuth": "Required"})), None).unwrap();
    validate_object(&broker(json!({"issuerRef": {"name": "ca", "kind": "ClusterIssuer"}})), None).unwrap();
    let e = errors_of(&broker(json!({})), None);
    assert!(e.contains("set exactly one of secretName and issuerRef"), "{e}");
    let e = errors_of(&broker(json!({"secretName": "a", "issuerRef": {"name": "ca"}})), None);
    assert!(e.contains("set exactly one of secretName and issuerRef"), "{e}");
}
