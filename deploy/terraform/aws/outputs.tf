# Read by scripts/launch_training.sh --mode k8s --terraform deploy/terraform/aws and docs/deployment.md.

output "cloud" {
  description = "Which module produced these outputs."
  value       = "aws"
}

output "region" {
  description = "AWS region."
  value       = var.region
}

output "cluster_name" {
  description = "EKS cluster the GPU node group belongs to."
  value       = local.cluster_name
}

output "kubeconfig_command" {
  description = "Command that points kubectl at the cluster."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${local.cluster_name}"
}

output "gpu_node_group" {
  description = "Name of the GPU node group."
  value       = aws_eks_node_group.gpu.node_group_name
}

output "gpus_per_node" {
  description = "GPUs per node of gpu_instance_type (GPUS_PER_NODE in the Kubernetes settings)."
  value       = 8
}

output "gpu_node_max" {
  description = "Most GPU nodes (MAX_NODES in the Kubernetes settings must not exceed it)."
  value       = var.gpu_node_max
}

output "checkpoint_bucket" {
  description = "S3 bucket for checkpoints."
  value       = aws_s3_bucket.checkpoints.bucket
}

output "checkpoint_url" {
  description = "checkpoint.dir prefix for imgtrain (append the run name)."
  value       = "s3://${aws_s3_bucket.checkpoints.bucket}"
}

output "image_repository_url" {
  description = "ECR repository to push the image built from deploy/docker/Dockerfile to."
  value       = aws_ecr_repository.imgtrain.repository_url
}

output "node_role_arn" {
  description = "IAM role of the GPU nodes (no access to the checkpoint bucket)."
  value       = aws_iam_role.gpu_node.arn
}

output "trainer_role_arn" {
  description = "IAM role of the job's service account (annotation eks.amazonaws.com/role-arn in deploy/kubernetes/overlays/aws/serviceaccount.yaml): the only one with access to the checkpoint bucket."
  value       = aws_iam_role.trainer.arn
}
