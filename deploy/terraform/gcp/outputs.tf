# Read by scripts/launch_training.sh --mode k8s --terraform deploy/terraform/gcp and docs/deployment.md.

output "cloud" {
  description = "Which module produced these outputs."
  value       = "gcp"
}

output "region" {
  description = "Region of the cluster and the bucket."
  value       = var.region
}

output "cluster_name" {
  description = "GKE cluster the GPU node pool belongs to."
  value       = local.cluster_name
}

output "kubeconfig_command" {
  description = "Command that points kubectl at the cluster."
  value       = "gcloud container clusters get-credentials ${local.cluster_name} --region ${var.region} --project ${var.project_id}"
}

output "gpu_node_pool" {
  description = "Name of the GPU node pool."
  value       = google_container_node_pool.gpu.name
}

output "gpu_type" {
  description = "Accelerator label of the GPU nodes (cloud.google.com/gke-accelerator)."
  value       = var.gpu_type
}

output "gpus_per_node" {
  description = "GPUs per node (GPUS_PER_NODE in the Kubernetes settings)."
  value       = var.gpus_per_node
}

output "gpu_node_max" {
  description = "Most GPU nodes (MAX_NODES in the Kubernetes settings must not exceed it)."
  value       = var.gpu_node_max
}

output "checkpoint_bucket" {
  description = "GCS bucket for checkpoints."
  value       = google_storage_bucket.checkpoints.name
}

output "checkpoint_url" {
  description = "checkpoint.dir prefix for imgtrain (append the run name)."
  value       = "gs://${google_storage_bucket.checkpoints.name}"
}

output "image_repository_url" {
  description = "Artifact Registry repository to push the image built from deploy/docker/Dockerfile to."
  value       = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.imgtrain.repository_id}/imgtrain"
}

output "workload_service_account" {
  description = "Google service account of the training pods (annotation iam.gke.io/gcp-service-account)."
  value       = google_service_account.trainer.email
}
