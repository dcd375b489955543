//! Reflection, as independent clients use it: both `grpc.reflection.v1` and
//! `v1alpha` list the services and serve the descriptors of the whole contract
//! (with their imports), so a client needs no proto files.

mod common;

use common::*;
use prost::Message as _;
use prost_types::FileDescriptorProto;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn v1_reflection_lists_services_and_serves_the_contract() {
    let server = TestServer::start(config(None, &serial("refl"))).await;
    let endpoint = server.endpoint();

    let MessageResponse::ListServicesResponse(list) =
        reflection_ask(&endpoint, MessageRequest::ListServices(String::new())).await
    else {
        panic!("expected a service list");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "comtrexx.licensing.v1.LicensingService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    // The vendor protocol is the simulator's, not this service's.
    assert!(
        !names.iter().any(|n| n.starts_with("comtrexx.vendor")),
        "{names:?}"
    );

    let MessageResponse::FileDescriptorResponse(files) = reflection_ask(
        &endpoint,
        MessageRequest::FileContainingSymbol("comtrexx.licensing.v1.LicensingService".into()),
    )
    .await
    else {
        panic!("expected file descriptors");
    };
    let files: Vec<FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|b| FileDescriptorProto::decode(b.as_slice()).unwrap())
        .collect();
    let contract = files
        .iter()
        .find(|f| f.package() == "comtrexx.licensing.v1")
        .expect("the contract's file");
    let rpcs: Vec<&str> = contract.service[0]
        .method
        .iter()
        .map(|m| m.name())
        .collect();
    for rpc in [
        "CheckSeat",
        "AssignSeat",
        "ReleaseSeat",
        "ListSeats",
        "GetTryoutStatus",
        "StartTryout",
        "EndTryout",
        "GetLicenseOverview",
        "Reconcile",
        "CreateInitializationCode",
        "ApplyActivation",
        "WatchLicenseEvents",
    ] {
        assert!(rpcs.contains(&rpc), "{rpc} missing from {rpcs:?}");
    }
    // Imports come along (or are served on request), so timestamps resolve.
    assert!(
        contract
            .dependency
            .iter()
            .any(|d| d == "google/protobuf/timestamp.proto")
    );
    let MessageResponse::FileDescriptorResponse(ts) = reflection_ask(
        &endpoint,
        MessageRequest::FileByFilename("google/protobuf/timestamp.proto".into()),
    )
    .await
    else {
        panic!("expected timestamp.proto");
    };
    assert!(!ts.file_descriptor_proto.is_empty());

    // Error details decode by reflection too.
    let MessageResponse::FileDescriptorResponse(info) = reflection_ask(
        &endpoint,
        MessageRequest::FileContainingSymbol("google.rpc.ErrorInfo".into()),
    )
    .await
    else {
        panic!("expected google.rpc.ErrorInfo");
    };
    assert!(!info.file_descriptor_proto.is_empty());
    server.shutdown().await;
}
