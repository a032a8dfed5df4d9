terraform {
  required_version = ">= 1.9" # cross-variable validation (gpu_node_min <= gpu_node_max)
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 5.20, < 7.0"
    }
  }
}

# Credentials come from the environment (gcloud auth application-default login, a workload identity),
# never from these files.
provider "google" {
  project = var.project_id
  region  = var.region
}
