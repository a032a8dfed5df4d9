locals {
  machine_type = {
    "nvidia-tesla-a100" = "a2-highgpu-${var.gpus_per_node}g"
    "nvidia-a100-80gb"  = "a2-ultragpu-${var.gpus_per_node}g"
    "nvidia-h100-80gb"  = "a3-highgpu-${var.gpus_per_node}g"
  }[var.gpu_type]
  cluster_id   = var.create_cluster ? google_container_cluster.this[0].id : data.google_container_cluster.existing[0].id
  cluster_name = var.create_cluster ? google_container_cluster.this[0].name : data.google_container_cluster.existing[0].name
  labels       = merge({ "app-kubernetes-io-name" = "imgtrain" }, var.labels)
}

# ---------------------------------------------------------------- GKE cluster (optional)

data "google_container_cluster" "existing" {
  count    = var.create_cluster ? 0 : 1
  name     = var.cluster_name
  location = var.region
}

resource "google_container_cluster" "this" {
  #checkov:skip=CKV_GCP_66:Binary Authorization needs an attestation pipeline for the imgtrain image that this module cannot assume
  #checkov:skip=CKV_GCP_65:RBAC through Google Groups needs a Workspace domain; access is granted with IAM roles instead
  count    = var.create_cluster ? 1 : 0
  name     = var.cluster_name
  location = var.region

  # The default pool is replaced by the node pools below (system and GPU).
  remove_default_node_pool = true
  initial_node_count       = 1
  deletion_protection      = true

  network         = var.network
  subnetwork      = var.subnetwork
  networking_mode = "VPC_NATIVE"
  ip_allocation_policy {}
  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = "172.16.0.32/28"
  }
  master_authorized_networks_config {
    dynamic "cidr_blocks" {
      for_each = var.master_authorized_cidrs
      content {
        cidr_block = cidr_blocks.value
      }
    }
  }
  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }
  release_channel {
    channel = "REGULAR"
  }
  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }
  network_policy {
    enabled = true
  }
  enable_intranode_visibility = true
  enable_shielded_nodes       = true
  addons_config {
    gcp_filestore_csi_driver_config {
      enabled = true # deploy/kubernetes/storage-classes/gke-filestore.yaml
    }
    gcs_fuse_csi_driver_config {
      enabled = true
    }
  }
  node_config {
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
  resource_labels    = local.labels
  logging_service    = "logging.googleapis.com/kubernetes"
  monitoring_service = "monitoring.googleapis.com/kubernetes"
}

# ---------------------------------------------------------------- system node pool (created cluster only)

# The GPU pool is tainted: cluster add-ons (kube-dns, the training operator, Prometheus) need untainted nodes.
resource "google_container_node_pool" "system" {
  count      = var.create_cluster ? 1 : 0
  name       = "${var.cluster_name}-system"
  cluster    = local.cluster_id
  location   = var.region
  node_count = 1 # per zone of the region
  management {
    auto_repair  = true
    auto_upgrade = true
  }
  node_config {
    machine_type    = "e2-standard-4"
    image_type      = "COS_CONTAINERD"
    service_account = google_service_account.gpu_node.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    labels          = local.labels
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

# ---------------------------------------------------------------- GPU node pool

resource "google_service_account" "gpu_node" {
  account_id   = "${var.cluster_name}-gpu-node"
  display_name = "imgtrain GPU nodes"
}

resource "google_project_iam_member" "gpu_node" {
  for_each = toset(["roles/logging.logWriter", "roles/monitoring.metricWriter", "roles/artifactregistry.reader"])
  project  = var.project_id
  role     = each.value
  member   = "serviceAccount:${google_service_account.gpu_node.email}"
}

resource "google_container_node_pool" "gpu" {
  name     = "${var.cluster_name}-gpu"
  cluster  = local.cluster_id
  location = var.region
  # One zone: NCCL traffic stays inside it, and a compact placement needs it.
  node_locations = [var.zone]

  autoscaling {
    total_min_node_count = var.gpu_node_min
    total_max_node_count = var.gpu_node_max
  }
  management {
    auto_repair  = true
    auto_upgrade = true
  }
  node_config {
    machine_type    = local.machine_type
    spot            = var.spot
    image_type      = "COS_CONTAINERD"
    disk_size_gb    = 500
    service_account = google_service_account.gpu_node.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    guest_accelerator {
      type  = var.gpu_type
      count = var.gpus_per_node
      gpu_driver_installation_config {
        gpu_driver_version = "LATEST" # GKE installs the driver and the device plugin
      }
    }
    # GKE taints GPU nodes with nvidia.com/gpu=present:NoSchedule itself, and spot nodes with
    # cloud.google.com/gke-spot; the job tolerates both (deploy/kubernetes/pytorchjob).
    labels = merge(local.labels, { "imgtrain-io-pool" = "gpu" })
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

# ---------------------------------------------------------------- Workload Identity for the job

resource "google_service_account" "trainer" {
  account_id   = "${var.cluster_name}-trainer"
  display_name = "imgtrain training pods (checkpoint bucket)"
}

# Pods running as Kubernetes service account <namespace>/imgtrain (deploy/kubernetes/overlays/gke) act as
# this Google service account: no key files.
resource "google_service_account_iam_member" "trainer_workload_identity" {
  service_account_id = google_service_account.trainer.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${var.kubernetes_namespace}/imgtrain]"
}

resource "google_storage_bucket_iam_member" "trainer_checkpoints" {
  bucket = google_storage_bucket.checkpoints.name
  role   = "roles/storage.objectAdmin"
  member = "serviceAccount:${google_service_account.trainer.email}"
}

# ---------------------------------------------------------------- image registry

resource "google_artifact_registry_repository" "imgtrain" {
  #checkov:skip=CKV_GCP_84:The image holds code and public packages only, no secrets or data; Google-managed encryption suffices
  location      = var.region
  repository_id = "imgtrain"
  format        = "DOCKER"
  docker_config {
    immutable_tags = true
  }
  labels = local.labels
}
