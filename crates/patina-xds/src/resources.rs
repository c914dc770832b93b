//! The xDS resources Patina serves for an app, all named after the app:
//!
//! - a `Cluster` of type EDS whose endpoints come over ADS, round robin;
//! - its `ClusterLoadAssignment`: one locality per region with routable instances, nearest
//!   first by priority, weighted by healthy count;
//! - a `Listener` with an API listener (an `HttpConnectionManager` with an inline
//!   `RouteConfiguration` sending everything to the cluster and the router filter): what
//!   proxyless gRPC clients resolve for `xds:///APP`.
//!
//! A resource's version is a hash of its encoding: the same content has the same version on
//! every agent and across restarts, so a delta client that reconnects with the versions it
//! holds is sent only what differs.

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::google::protobuf::{Any, Duration, UInt32Value};
use prost::{Message, Name};

/// The resource types a stream can ask for, in the order a change is sent (make before
/// break: a cluster before its endpoints, a listener after the cluster it routes to).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Type {
    Cluster,
    Endpoints,
    Listener,
    /// Route configurations: Patina's listeners carry theirs inline, so none is named; a
    /// request for them is answered with none.
    Route,
}

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

impl Type {
    pub const ALL: [Type; 4] = [Type::Cluster, Type::Endpoints, Type::Listener, Type::Route];

    pub fn from_url(url: &str) -> Option<Type> {
        Some(match url {
            CLUSTER => Type::Cluster,
            ENDPOINTS => Type::Endpoints,
            LISTENER => Type::Listener,
            ROUTE => Type::Route,
            _ => return None,
        })
    }

    pub fn url(self) -> &'static str {
        match self {
            Type::Cluster => CLUSTER,
            Type::Endpoints => ENDPOINTS,
            Type::Listener => LISTENER,
            Type::Route => ROUTE,
        }
    }

    /// Types whose state-of-the-world responses must hold every subscribed resource (a
    /// resource left out is deleted); for the others a response holds what changed.
    pub fn full_state(self) -> bool {
        matches!(self, Type::Cluster | Type::Listener)
    }

    /// Whether the resource depends on the instances (else only on the app's existence).
    pub fn follows_endpoints(self) -> bool {
        matches!(self, Type::Endpoints)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// One endpoint: an IP address and a port, with the instance's other addresses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Addr {
    pub ip: std::net::IpAddr,
    pub port: u16,
}

impl Addr {
    /// `ip:port` or `[v6]:port`, as machines and the region table give them.
    pub fn parse(s: &str) -> Option<Addr> {
        let sa: std::net::SocketAddr = s.parse().ok()?;
        Some(Addr {
            ip: sa.ip(),
            port: sa.port(),
        })
    }
}

/// One endpoint (an instance, or a region's ingress address) with its further addresses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Host {
    pub addr: Addr,
    pub more: Vec<Addr>,
}

/// A locality: one region's endpoints at a priority (0: nearest), with a weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locality {
    pub region: String,
    pub priority: u32,
    /// At least 1: proxyless gRPC ignores localities without a weight.
    pub weight: u32,
    pub hosts: Vec<Host>,
}

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn socket(a: &Addr) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: a.ip.to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                a.port,
            ))),
            ..Default::default()
        })),
    }
}

/// The app's cluster: type EDS over ADS, round robin.
pub fn cluster(app: &str) -> Any {
    any(&cluster::Cluster {
        name: app.to_owned(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            eds_config: Some(core::ConfigSource {
                config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
                    core::AggregatedConfigSource {},
                )),
                resource_api_version: core::ApiVersion::V3 as i32,
                ..Default::default()
            }),
            service_name: String::new(),
        }),
        connect_timeout: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
        lb_policy: cluster::cluster::LbPolicy::RoundRobin as i32,
        ..Default::default()
    })
}

/// The app's endpoints: every host is healthy (only routable instances and regions with
/// healthy instances are listed: sending unhealthy ones would let Envoy's panic threshold
/// route to them).
pub fn endpoints(app: &str, localities: &[Locality]) -> Any {
    any(&endpoint::ClusterLoadAssignment {
        cluster_name: app.to_owned(),
        endpoints: localities
            .iter()
            .map(|l| endpoint::LocalityLbEndpoints {
                locality: Some(core::Locality {
                    region: l.region.clone(),
                    ..Default::default()
                }),
                lb_endpoints: l
                    .hosts
                    .iter()
                    .map(|h| endpoint::LbEndpoint {
                        host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                            endpoint::Endpoint {
                                address: Some(socket(&h.addr)),
                                additional_addresses: h
                                    .more
                                    .iter()
                                    .map(|a| endpoint::endpoint::AdditionalAddress {
                                        address: Some(socket(a)),
                                    })
                                    .collect(),
                                ..Default::default()
                            },
                        )),
                        health_status: core::HealthStatus::Healthy as i32,
                        ..Default::default()
                    })
                    .collect(),
                load_balancing_weight: Some(UInt32Value {
                    value: l.weight.max(1),
                }),
                priority: l.priority,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}

/// The app's listener for proxyless gRPC: an API listener whose HTTP connection manager
/// routes every request to the app's cluster.
pub fn listener(app: &str) -> Any {
    let manager = hcm::HttpConnectionManager {
        stat_prefix: app.to_owned(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
            route::RouteConfiguration {
                name: app.to_owned(),
                virtual_hosts: vec![route::VirtualHost {
                    name: app.to_owned(),
                    domains: vec!["*".to_owned()],
                    routes: vec![route::Route {
                        r#match: Some(route::RouteMatch {
                            path_specifier: Some(route::route_match::PathSpecifier::Prefix(
                                String::new(),
                            )),
                            ..Default::default()
                        }),
                        action: Some(route::route::Action::Route(route::RouteAction {
                            cluster_specifier: Some(
                                route::route_action::ClusterSpecifier::Cluster(app.to_owned()),
                            ),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters: vec![hcm::HttpFilter {
            name: "envoy.filters.http.router".to_owned(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                &Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    any(&listener::Listener {
        name: app.to_owned(),
        api_listener: Some(listener::ApiListener {
            api_listener: Some(any(&manager)),
        }),
        ..Default::default()
    })
}

/// A resource's version: a hash (FNV-1a, 64 bits) of its encoding, in hex.
pub fn version_of(resource: &Any) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in resource.value.iter() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_decode_as_their_types_and_name_the_app() {
        let c = cluster::Cluster::decode(&*cluster("web").value).unwrap();
        assert_eq!(c.name, "web");
        assert_eq!(cluster("web").type_url, CLUSTER);
        let l = listener::Listener::decode(&*listener("web").value).unwrap();
        assert_eq!(listener("web").type_url, LISTENER);
        let api = l.api_listener.unwrap().api_listener.unwrap();
        let m = hcm::HttpConnectionManager::decode(&*api.value).unwrap();
        let Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(rc)) = m.route_specifier
        else {
            panic!("inline route configuration expected");
        };
        let Some(route::route::Action::Route(a)) = &rc.virtual_hosts[0].routes[0].action else {
            panic!("a route action expected");
        };
        assert_eq!(
            a.cluster_specifier,
            Some(route::route_action::ClusterSpecifier::Cluster("web".into()))
        );
        let e = endpoints(
            "web",
            &[Locality {
                region: "ord".into(),
                priority: 0,
                weight: 0,
                hosts: vec![Host {
                    addr: Addr::parse("[::1]:8080").unwrap(),
                    more: vec![],
                }],
            }],
        );
        assert_eq!(e.type_url, ENDPOINTS);
        let cla = endpoint::ClusterLoadAssignment::decode(&*e.value).unwrap();
        assert_eq!(cla.endpoints[0].load_balancing_weight.unwrap().value, 1);
        assert_ne!(version_of(&e), version_of(&endpoints("web", &[])));
        assert_eq!(version_of(&e), version_of(&e.clone()));
    }
}
