#!/bin/bash
# devstack/plugin.sh - nova-compute's cold snapshots taken by snapworker.
#
# Installs snapworker with its Nova extra beside nova-compute, writes
# /etc/snapworker/snapworker.conf from the generated sample with the
# settings it must share with nova-compute (host, instances path, libvirt
# URI, messaging), points nova-compute at SnapworkerLibvirtDriver and runs
# snapworker-worker as a devstack service.

# Print $3 of section $2 in ini file $1, or $4 when it is unset or empty.
function _snapworker_iniget_or {
    local value
    value=$(iniget "$1" "$2" "$3")
    echo "${value:-$4}"
}

function install_snapworker {
    # The [nova] extra: the driver subclasses the Nova installed here.
    setup_develop "$SNAPWORKER_DIR" nova
    # Nova loads compute_driver only from inside nova.virt: put the one-line
    # re-export module into the Nova that nova-compute runs.
    "$(get_python_exec_prefix)/snapworker-nova-driver" install
}

# The worker acts as nova-compute's delegate: it must find the same host
# name, disks and libvirt, and talk on nova-compute's exchange.
function configure_snapworker {
    local conf=$SNAPWORKER_CONF key value
    sudo install -d -o "$STACK_USER" "$SNAPWORKER_CONF_DIR"
    install -d "$SNAPWORKER_SCRATCH_DIR"
    install -d -m 0700 "$SNAPWORKER_JOURNAL_DIR"
    cp "$SNAPWORKER_DIR/etc/snapworker/snapworker.conf.sample" "$conf"

    iniset "$conf" DEFAULT debug "$ENABLE_DEBUG_LOG_LEVEL"
    iniset "$conf" DEFAULT host \
        "$(_snapworker_iniget_or "$NOVA_CONF" DEFAULT host "$(hostname)")"
    iniset "$conf" DEFAULT instances_path "$NOVA_INSTANCES_PATH"
    iniset "$conf" DEFAULT scratch_dir "$SNAPWORKER_SCRATCH_DIR"
    iniset "$conf" worker journal_dir "$SNAPWORKER_JOURNAL_DIR"
    iniset "$conf" DEFAULT libvirt_uri \
        "$(_snapworker_iniget_or "$NOVA_CONF" libvirt connection_uri \
            qemu:///system)"

    # Requests arrive on Nova's exchange; notifications go where
    # nova-compute's driver listens for them.
    iniset "$conf" DEFAULT transport_url "$(get_transport_url)"
    iniset "$conf" DEFAULT control_exchange nova
    iniset "$conf" oslo_messaging_notifications driver messagingv2
    iniset "$conf" oslo_messaging_notifications transport_url \
        "$(get_notification_url)"

    # Nova's request context may carry no image endpoint in its catalog.
    iniset "$conf" glance endpoint_override "$GLANCE_URL"
    iniset "$conf" glance region_name "$REGION_NAME"
    # Long uploads outlive the user's token: send nova's service token too.
    for key in send_service_user_token auth_type auth_url username \
        password user_domain_name project_name project_domain_name; do
        value=$(iniget "$NOVA_CONF" service_user "$key")
        if [[ -n $value ]]; then
            iniset "$conf" service_user "$key" "$value"
        fi
    done

    # Nova's LVM volumes are the only block devices the worker may read.
    if [[ $(iniget "$NOVA_CONF" libvirt images_type) == lvm ]]; then
        iniset "$conf" worker block_device_prefixes \
            "/dev/$(iniget "$NOVA_CONF" libvirt images_volume_group)/"
    fi

    if [[ $(iniget "$NOVA_CONF" libvirt images_type) == rbd ]]; then
        iniset "$conf" rbd ceph_conf \
            "$(_snapworker_iniget_or "$NOVA_CONF" libvirt \
                images_rbd_ceph_conf /etc/ceph/ceph.conf)"
        iniset "$conf" rbd user "$(iniget "$NOVA_CONF" libvirt rbd_user)"
        if [[ -n $SNAPWORKER_RBD_GLANCE_POOL ]]; then
            iniset "$conf" rbd glance_pool "$SNAPWORKER_RBD_GLANCE_POOL"
        fi
    fi

    # nova-compute's own config: start_nova_compute copies $NOVA_CONF to
    # nova-cpu.conf, so this is where the driver choice must go.
    iniset "$NOVA_CONF" DEFAULT compute_driver \
        snapworker.SnapworkerLibvirtDriver
    iniset "$NOVA_CONF" snapworker accept_timeout "$SNAPWORKER_ACCEPT_TIMEOUT"
    # A request Nova has given up on is not run: the same number.
    iniset "$conf" worker max_request_age "$SNAPWORKER_ACCEPT_TIMEOUT"
}

function start_snapworker {
    run_process snapworker-worker \
        "$(get_python_exec_prefix)/snapworker-worker --config-file $SNAPWORKER_CONF"
}

function stop_snapworker {
    stop_process snapworker-worker
}

function cleanup_snapworker {
    "$(get_python_exec_prefix)/snapworker-nova-driver" remove || true
    sudo rm -rf "$SNAPWORKER_CONF_DIR" "$SNAPWORKER_SCRATCH_DIR"
}

if is_service_enabled snapworker-worker; then
    if [[ "$1" == "stack" && "$2" == "install" ]]; then
        echo_summary "Installing snapworker"
        install_snapworker
    elif [[ "$1" == "stack" && "$2" == "post-config" ]]; then
        echo_summary "Configuring snapworker"
        configure_snapworker
    elif [[ "$1" == "stack" && "$2" == "extra" ]]; then
        echo_summary "Starting snapworker"
        start_snapworker
    fi

    if [[ "$1" == "unstack" ]]; then
        stop_snapworker
    fi

    if [[ "$1" == "clean" ]]; then
        cleanup_snapworker
    fi
fi
